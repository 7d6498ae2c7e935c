//! The network configuration a runtime passes on the plugin's stdin (a plain
//! conf, or one plugin of a conflist with `prevResult`, `runtimeConfig`,
//! `cni.dev/valid-attachments`): `NetConf::parse`, the error JSON printed
//! for what it refuses, and the prevResult reader/writer.
//!
//! Invariants: a refusal carries one of the config error codes and prints as
//! valid error JSON; an accepted config has a supported version, a name
//! following the CNI rules, an MTU in range and a safe IPAM plugin name; it
//! re-serializes to a config that parses to the same value; a prevResult
//! podnet reads and prints again reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podnet::cni::{
    config::{IpamConf, NetConf, sniff_version},
    error::code,
    result::CniResult,
    version::{self, Version},
};
use podnet_fuzz::{is_cni_name, json_eq};
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| check(data));

fn check(data: &[u8]) {
    let sniffed = sniff_version(data);
    match NetConf::parse(data) {
        Err(e) => {
            assert!(
                matches!(
                    e.code,
                    code::DECODE_FAILURE | code::INVALID_CONFIG | code::INCOMPATIBLE_VERSION
                ),
                "unexpected code: {e}"
            );
            // What the plugin prints on stdout for it.
            let version = sniffed.as_deref().unwrap_or(version::CURRENT);
            let printed: Value =
                serde_json::from_str(&e.to_json(version)).expect("error JSON is JSON");
            assert_eq!(printed["code"], e.code);
            assert_eq!(printed["msg"], e.msg.as_str());
            assert_eq!(printed["cniVersion"], version);
        }
        Ok(conf) => {
            accepted(&conf, data, sniffed.as_deref());
            let text = reserialize(&conf);
            let again = NetConf::parse(text.as_bytes())
                .unwrap_or_else(|e| panic!("re-serialized config refused: {e}\n{text}"));
            assert_same(&conf, &again);
            if let Some(prev) = &conf.prev_result {
                prev_result(prev, &conf);
            }
        }
    }
}

fn accepted(conf: &NetConf, data: &[u8], sniffed: Option<&str>) {
    assert_eq!(conf.raw, data);
    assert_eq!(sniffed, Some(conf.cni_version.as_str()));
    assert!(version::SUPPORTED.contains(&conf.cni_version.as_str()));
    assert_eq!(
        Version::parse_supported(&conf.cni_version),
        Some(conf.version)
    );
    assert!(is_cni_name(&conf.name), "accepted name {:?}", conf.name);
    if let Some(mtu) = conf.mtu {
        assert!((68..=65535).contains(&mtu), "accepted mtu {mtu}");
    }
    if let IpamConf::Delegated { plugin } = &conf.ipam {
        // Run from CNI_PATH: a name, never a path.
        assert!(!plugin.is_empty() && !plugin.contains('/') && plugin != "podnet");
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("paths read from JSON are UTF-8")
}

/// The configuration `conf` stands for, as JSON.
fn reserialize(conf: &NetConf) -> String {
    let mut v = json!({
        "cniVersion": conf.cni_version,
        "name": conf.name,
        "type": conf.plugin_type,
        "agentSocket": path(&conf.agent_socket),
        "runtimeConfig": {"portMappings": []},
    });
    if let Some(mtu) = conf.mtu {
        v["mtu"] = json!(mtu);
    }
    match &conf.ipam {
        IpamConf::BuiltIn { data_dir: None } => {}
        IpamConf::BuiltIn {
            data_dir: Some(dir),
        } => v["ipam"] = json!({"type": "podnet", "dataDir": path(dir)}),
        IpamConf::Delegated { plugin } => v["ipam"] = json!({"type": plugin}),
    }
    if let Some(prev) = &conf.prev_result {
        v["prevResult"] = prev.clone();
    }
    if let Some(list) = &conf.valid_attachments {
        v["cni.dev/valid-attachments"] = list
            .iter()
            .map(|o| json!({"containerID": o.container_id, "ifname": o.ifname}))
            .collect();
    }
    v.to_string()
}

fn assert_same(a: &NetConf, b: &NetConf) {
    assert_eq!(a.cni_version, b.cni_version);
    assert_eq!(a.version, b.version);
    assert_eq!(a.name, b.name);
    assert_eq!(a.plugin_type, b.plugin_type);
    assert_eq!(a.agent_socket, b.agent_socket);
    assert_eq!(a.mtu, b.mtu);
    assert_eq!(a.ipam, b.ipam);
    assert_eq!(a.valid_attachments, b.valid_attachments);
    match (&a.prev_result, &b.prev_result) {
        (None, None) => {}
        (Some(x), Some(y)) => assert!(json_eq(x, y), "prevResult changed: {x} vs {y}"),
        (x, y) => panic!("prevResult changed: {x:?} vs {y:?}"),
    }
}

/// A chained plugin's prevResult: what podnet reads of it and prints again
/// (ADD appends its own entries to it) reads back the same.
fn prev_result(prev: &Value, conf: &NetConf) {
    let read = match CniResult::from_json(prev) {
        Ok(read) => read,
        Err(e) => {
            assert_eq!(e.code, code::DECODE_FAILURE, "{e}");
            return;
        }
    };
    let out = read.to_json(&conf.cni_version, conf.version);
    assert_eq!(out["cniVersion"], conf.cni_version.as_str());
    for ip in out["ips"].as_array().expect("ips is a list") {
        if conf.version < Version::V1_0_0 {
            assert_eq!(ip["version"], "4");
        } else {
            assert!(ip.get("version").is_none());
        }
    }
    let printed = out.to_string();
    let back = CniResult::from_json(&serde_json::from_str(&printed).expect("printed JSON"))
        .unwrap_or_else(|e| panic!("printed result does not read back: {e}\n{printed}"));
    let mut expected = read.clone();
    if conf.version < Version::V1_1_0 {
        // Interface MTUs exist from 1.1.0 on.
        for i in &mut expected.interfaces {
            i.mtu = None;
        }
    }
    assert_eq!(back.interfaces, expected.interfaces);
    assert_eq!(back.ips, expected.ips);
    assert_eq!(back.routes, expected.routes);
    let dns = if read.dns.is_null() {
        json!({})
    } else {
        read.dns.clone()
    };
    assert!(
        json_eq(&back.dns, &dns),
        "dns changed: {dns} vs {}",
        back.dns
    );
}
