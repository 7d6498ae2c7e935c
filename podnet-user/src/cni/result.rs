//! The Result a plugin prints, in each supported version's shape.
//!
//! 0.3.x/0.4.0 carry `"version": "4"` on every IP; 1.0.0 drops it; 1.1.0
//! adds `mtu` on interfaces.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use super::{
    error::{CniError, code},
    version::Version,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// The netns path for a pod-side interface; `None` on the host.
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteEntry>,
    pub dns: Value,
}

pub use crate::endpoint::{format_mac, parse_mac};

impl CniResult {
    /// The JSON of this result in `cni_version`.
    #[must_use]
    pub fn to_json(&self, cni_version: &str, version: Version) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({"name": i.name, "mac": i.mac});
                if let Some(sandbox) = &i.sandbox {
                    v["sandbox"] = json!(sandbox);
                }
                if let (Some(mtu), true) = (i.mtu, version >= Version::V1_1_0) {
                    v["mtu"] = json!(mtu);
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({"address": ip.address.to_string()});
                if version < Version::V1_0_0 {
                    v["version"] = json!("4");
                }
                if let Some(gw) = ip.gateway {
                    v["gateway"] = json!(gw.to_string());
                }
                if let Some(index) = ip.interface {
                    v["interface"] = json!(index);
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({"dst": r.dst.to_string()});
                if let Some(gw) = r.gw {
                    v["gw"] = json!(gw.to_string());
                }
                v
            })
            .collect();
        let mut out = json!({"cniVersion": cni_version, "interfaces": interfaces, "ips": ips, "routes": routes});
        out["dns"] = if self.dns.is_null() {
            json!({})
        } else {
            self.dns.clone()
        };
        out
    }

    /// Reads a result of any supported version (prevResult, a delegated
    /// IPAM plugin's answer). IPv6 entries are skipped: podnet is IPv4.
    pub fn from_json(value: &Value) -> Result<Self, CniError> {
        let bad =
            |what: &str| CniError::new(code::DECODE_FAILURE, format!("malformed result: {what}"));
        let mut result = Self {
            dns: value.get("dns").cloned().unwrap_or(Value::Null),
            ..Self::default()
        };
        for i in value
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            result.interfaces.push(Interface {
                name: i
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("interface without name"))?
                    .to_owned(),
                mac: i
                    .get("mac")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                mtu: i
                    .get("mtu")
                    .and_then(Value::as_u64)
                    .and_then(|m| u32::try_from(m).ok()),
                sandbox: i.get("sandbox").and_then(Value::as_str).map(str::to_owned),
            });
        }
        for ip in value
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("ip without address"))?;
            let Ok(address) = address.parse::<Ipv4Net>() else {
                continue;
            };
            result.ips.push(IpConfig {
                address,
                gateway: ip
                    .get("gateway")
                    .and_then(Value::as_str)
                    .and_then(|g| g.parse().ok()),
                interface: ip
                    .get("interface")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok()),
            });
        }
        for r in value
            .get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(Ok(dst)) = r
                .get("dst")
                .and_then(Value::as_str)
                .map(str::parse::<Ipv4Net>)
            else {
                continue;
            };
            result.routes.push(RouteEntry {
                dst,
                gw: r
                    .get("gw")
                    .and_then(Value::as_str)
                    .and_then(|g| g.parse().ok()),
            });
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: Some(1450),
                sandbox: Some("/var/run/netns/p".into()),
            }],
            ips: vec![IpConfig {
                address: "10.244.0.5/32".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(10, 244, 0, 1)),
                interface: Some(0),
            }],
            routes: vec![RouteEntry {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some(Ipv4Addr::new(10, 244, 0, 1)),
            }],
            dns: Value::Null,
        }
    }

    #[test]
    fn shape_per_version() {
        let r = sample();
        let old = r.to_json("0.3.1", Version(0, 3, 1));
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let v1 = r.to_json("1.0.0", Version::V1_0_0);
        assert!(v1["ips"][0].get("version").is_none());
        assert!(v1["interfaces"][0].get("mtu").is_none());
        let v11 = r.to_json("1.1.0", Version::V1_1_0);
        assert_eq!(v11["interfaces"][0]["mtu"], 1450);
        assert_eq!(v11["cniVersion"], "1.1.0");
        assert_eq!(v11["routes"][0]["gw"], "10.244.0.1");
    }

    #[test]
    fn round_trip() {
        let r = sample();
        for (s, v) in [("0.4.0", Version::V0_4_0), ("1.1.0", Version::V1_1_0)] {
            let back = CniResult::from_json(&r.to_json(s, v)).unwrap();
            assert_eq!(back.ips, r.ips);
            assert_eq!(back.routes, r.routes);
            assert_eq!(back.interfaces[0].name, "eth0");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
        assert_eq!(parse_mac("02:AB:00:00:00:01"), Some([2, 0xab, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:ab:00:00:00"), None);
    }
}
