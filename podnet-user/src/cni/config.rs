//! The network configuration a runtime passes on stdin (a plain conf, or one
//! plugin of a conflist with `name`/`cniVersion` injected and `prevResult`
//! when chained). Unknown keys are ignored, as the spec requires; known keys
//! with a wrong type or value are errors.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::{
    error::{CniError, code},
    validate,
    version::Version,
};
use crate::ipam::Owner;

/// The `ipam` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpamConf {
    /// podnet's own IPAM (`"type": "podnet"` or no `ipam` key).
    BuiltIn {
        /// Overrides where reservations are kept (default: the agent's).
        data_dir: Option<PathBuf>,
    },
    /// Another IPAM plugin, run from CNI_PATH.
    Delegated { plugin: String },
}

/// podnet's network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub version: Version,
    pub name: String,
    pub plugin_type: String,
    pub agent_socket: PathBuf,
    pub mtu: Option<u32>,
    pub ipam: IpamConf,
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<Owner>>,
    /// The configuration as received (passed to a delegated IPAM plugin).
    pub raw: Vec<u8>,
    /// `runtimeConfig.bandwidth` (the `bandwidth` capability), validated;
    /// `None` when absent or all zero.
    pub bandwidth: Option<crate::shaping::Bandwidth>,
    /// `ipv4BigTcp`: IPv4 BIG TCP on the pod's veth (both ends), see
    /// [`IPV4_BIG_TCP_MAX_SIZE`].
    pub ipv4_big_tcp: bool,
}

/// `ipv4BigTcp` when the conf does not say.
pub const DEFAULT_IPV4_BIG_TCP: bool = false;

/// The GSO/GRO limit for IPv4 with `ipv4BigTcp` (`gso_ipv4_max_size` and
/// `gro_ipv4_max_size`, Linux 6.3+), Cilium's value (192 KiB): TCP in the
/// pod builds up to this much per packet (instead of 64 KiB), and GRO on
/// the veth merges up to it, so the stack runs per-packet work (the
/// datapath's programs included) about three times less often per byte.
/// Above 64 KiB the IPv4 total length is 0 and the kernel uses the skb's
/// length (`iph_set_totlen`, 6.3).
pub const IPV4_BIG_TCP_MAX_SIZE: u32 = 196_608;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    agent_socket: Option<PathBuf>,
    mtu: Option<u32>,
    ipam: Option<WireIpam>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<WireAttachment>>,
    runtime_config: Option<WireRuntimeConfig>,
    ipv4_big_tcp: Option<bool>,
}

#[derive(Deserialize)]
struct WireRuntimeConfig {
    /// Parsed on its own, for the reference `bandwidth` plugin's messages.
    bandwidth: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireIpam {
    #[serde(rename = "type")]
    ipam_type: Option<String>,
    data_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The `cniVersion` of `stdin`, if it has a readable one (for error output).
#[must_use]
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(stdin).ok()?;
    value.get("cniVersion")?.as_str().map(str::to_owned)
}

impl NetConf {
    /// Parses and validates a configuration.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "network configuration is not valid JSON",
            )
            .with_details(e.to_string())
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                "network configuration must be a JSON object",
            ));
        }
        let wire: Wire = serde_json::from_value(value).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "invalid network configuration")
                .with_details(e.to_string())
        })?;
        let cni_version = wire.cni_version.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "network configuration has no cniVersion",
            )
        })?;
        let version = Version::parse_supported(&cni_version).ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {cni_version} is not supported"),
            )
            .with_details(format!(
                "supported: {}",
                super::version::SUPPORTED.join(", ")
            ))
        })?;
        let name = wire.name.ok_or_else(|| {
            CniError::new(code::INVALID_CONFIG, "network configuration has no name")
        })?;
        validate::network_name(&name)?;
        let plugin_type = wire.plugin_type.unwrap_or_else(|| "podnet".to_owned());
        if wire.mtu.is_some_and(|m| !(68..=65535).contains(&m)) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "mtu must be between 68 and 65535",
            ));
        }
        let ipam = match wire.ipam {
            None => IpamConf::BuiltIn { data_dir: None },
            Some(WireIpam {
                ipam_type: None, ..
            }) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "ipam section has no type",
                ));
            }
            Some(WireIpam {
                ipam_type: Some(t),
                data_dir,
            }) if t == "podnet" => IpamConf::BuiltIn { data_dir },
            Some(WireIpam {
                ipam_type: Some(t), ..
            }) => {
                if t.is_empty() || t.contains('/') {
                    return Err(CniError::new(
                        code::INVALID_CONFIG,
                        format!("invalid ipam type {t:?}"),
                    ));
                }
                IpamConf::Delegated { plugin: t }
            }
        };
        let valid_attachments = wire.valid_attachments.map(|list| {
            list.into_iter()
                .map(|a| Owner {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect()
        });
        let bandwidth = wire
            .runtime_config
            .and_then(|r| r.bandwidth)
            .map(parse_bandwidth)
            .transpose()?
            .filter(|b| !b.is_zero());
        Ok(Self {
            cni_version,
            version,
            name,
            plugin_type,
            agent_socket: wire
                .agent_socket
                .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_SOCKET)),
            mtu: wire.mtu,
            ipam,
            prev_result: wire.prev_result,
            valid_attachments,
            raw: stdin.to_vec(),
            bandwidth,
            ipv4_big_tcp: wire.ipv4_big_tcp.unwrap_or(DEFAULT_IPV4_BIG_TCP),
        })
    }
}

/// `runtimeConfig.bandwidth`, refused with the reference `bandwidth`
/// plugin's messages (a runtime or an operator switching from it reads the
/// same errors); the code is 7, invalid configuration.
fn parse_bandwidth(value: Value) -> Result<crate::shaping::Bandwidth, CniError> {
    let bandwidth: crate::shaping::Bandwidth = serde_json::from_value(value).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("failed to parse network configuration: runtimeConfig.bandwidth: {e}"),
        )
    })?;
    bandwidth
        .validate()
        .map_err(|message| CniError::new(code::INVALID_CONFIG, message))?;
    Ok(bandwidth)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<NetConf, CniError> {
        NetConf::parse(json.as_bytes())
    }

    #[test]
    fn ipv4_big_tcp_is_off_unless_the_conf_turns_it_on_and_must_be_a_bool() {
        let conf = |extra: &str| {
            parse(&format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"podnet"{extra}}}"#
            ))
        };
        assert!(!conf("").expect("no key").ipv4_big_tcp);
        assert!(conf(r#","ipv4BigTcp":true"#).expect("on").ipv4_big_tcp);
        assert!(!conf(r#","ipv4BigTcp":false"#).expect("off").ipv4_big_tcp);
        let err = conf(r#","ipv4BigTcp":"yes""#).expect_err("not a bool");
        assert_eq!(err.code, code::INVALID_CONFIG);
    }

    #[test]
    fn bandwidth_comes_from_runtime_config_with_the_reference_messages() {
        let conf = |bw: &str| {
            parse(&format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"podnet","capabilities":{{"bandwidth":true}},
                   "runtimeConfig":{{"bandwidth":{bw}}}}}"#
            ))
        };
        let ok = conf(r#"{"ingressRate":100000000,"ingressBurst":1000000,"egressRate":1000000000,"egressBurst":10000000}"#)
            .expect("valid limits");
        let bw = ok.bandwidth.expect("limits");
        assert_eq!(
            (bw.ingress_rate, bw.egress_burst),
            (100_000_000, 10_000_000)
        );
        assert_eq!(conf("{}").expect("no limits").bandwidth, None);
        let err = conf(r#"{"ingressRate":-1,"ingressBurst":1000}"#).expect_err("negative");
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(
            err.msg.starts_with("failed to parse network configuration"),
            "{}",
            err.msg
        );
        let err = conf(r#"{"egressRate":1000}"#).expect_err("rate without burst");
        assert_eq!(err.msg, "if rate is set, burst must also be set");
    }

    #[test]
    fn minimal_conf_uses_defaults() {
        let conf =
            parse(r#"{"cniVersion":"1.1.0","name":"podnet","type":"podnet","unknownKey":[1,2]}"#)
                .unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from("/run/podnet/podnetd.sock"));
        assert_eq!(conf.ipam, IpamConf::BuiltIn { data_dir: None });
        assert_eq!(conf.mtu, None);
    }

    #[test]
    fn delegated_and_builtin_ipam() {
        let conf = parse(r#"{"cniVersion":"0.4.0","name":"n","type":"podnet","ipam":{"type":"host-local","ranges":[]}}"#).unwrap();
        assert_eq!(
            conf.ipam,
            IpamConf::Delegated {
                plugin: "host-local".into()
            }
        );
        let conf =
            parse(r#"{"cniVersion":"0.4.0","name":"n","ipam":{"type":"podnet","dataDir":"/x"}}"#)
                .unwrap();
        assert_eq!(
            conf.ipam,
            IpamConf::BuiltIn {
                data_dir: Some("/x".into())
            }
        );
    }

    #[test]
    fn errors_have_the_spec_codes() {
        let cases = [
            ("{not json", code::DECODE_FAILURE),
            ("[1]", code::DECODE_FAILURE),
            (
                r#"{"cniVersion":"9.9.9","name":"n"}"#,
                code::INCOMPATIBLE_VERSION,
            ),
            (r#"{"cniVersion":1,"name":"n"}"#, code::INVALID_CONFIG),
            (
                r#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","mtu":10}"#,
                code::INVALID_CONFIG,
            ),
            (r#"{"cniVersion":"1.0.0"}"#, code::INVALID_CONFIG),
            (
                r#"{"cniVersion":"1.0.0","name":"bad name"}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{}}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"../x"}}"#,
                code::INVALID_CONFIG,
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(parse(json).unwrap_err().code, expected, "{json}");
        }
    }

    #[test]
    fn valid_attachments_are_read() {
        let conf = parse(
            r#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.valid_attachments.unwrap().len(), 1);
    }
}
