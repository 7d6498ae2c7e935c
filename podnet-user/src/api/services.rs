//! The wire types of the agent's Service translation: who translates
//! (`podnetd --services`), its sync's status (in `podnetctl status`) and
//! the answer of `podnetctl services`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Who translates Services on this node (`podnetd --services`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ServicesMode {
    /// The datapath: from_pod translates ClusterIP connections from the
    /// Service maps the agent fills (`NODE_F_SERVICES_BPF`).
    Bpf,
    /// The node's kube-proxy (its rules in the stack); the datapath hands
    /// Service traffic to the stack and its Service maps stay empty.
    #[default]
    KubeProxy,
}

impl ServicesMode {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bpf => "bpf",
            Self::KubeProxy => "kube-proxy",
        }
    }
}

impl fmt::Display for ServicesMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `podnetctl status` and the metrics show of Service translation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesStatus {
    pub mode: ServicesMode,
    /// The maps were written from a full view of the cluster at least once
    /// by this agent (bpf mode).
    pub synced: bool,
    /// Services with a frontend, frontends and backend slots in the maps.
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Syncs done, how long the last one took (compile and writes) and
    /// when it ended (Unix ms).
    pub syncs: u64,
    pub last_sync_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_unix_ms: Option<u64>,
    /// Entries a map refused in the last sync (a full map).
    pub refused: u64,
    /// Frontends the last sync could not write completely: they translate
    /// to fewer backends than they have, or not at all.
    pub incomplete: usize,
    /// Services left out of a frontend another Service holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// Why the last sync failed or was incomplete, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl ServicesStatus {
    /// One line for `podnetctl status`.
    #[must_use]
    pub fn summary(&self) -> String {
        if self.mode == ServicesMode::KubeProxy {
            return "kube-proxy (the node's stack translates Services; the datapath's Service maps are unused)".to_owned();
        }
        let mut line = format!(
            "bpf: {} frontend(s) of {} Service(s), {} backend(s); {} sync(s), last {} ms",
            self.frontends, self.services, self.backends, self.syncs, self.last_sync_ms
        );
        if !self.synced {
            line.push_str("; NOT SYNCED (the pinned maps hold the last agent's Services)");
        }
        if self.refused > 0 {
            line.push_str("; ");
            line.push_str(&self.refused.to_string());
            line.push_str(" ENTRIES REFUSED (a map is full)");
        }
        if self.incomplete > 0 {
            line.push_str("; ");
            line.push_str(&self.incomplete.to_string());
            line.push_str(" FRONTEND(S) INCOMPLETE");
        }
        if !self.conflicts.is_empty() {
            line.push_str("; ");
            line.push_str(&self.conflicts.len().to_string());
            line.push_str(" conflicting Service port(s) left out");
        }
        if let Some(e) = &self.last_error {
            line.push_str("; ");
            line.push_str(e);
        }
        line
    }
}

/// The answer to `Request::Services`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesAnswer {
    pub status: ServicesStatus,
    /// Every Service with a frontend, in namespace/name order (empty in
    /// kube-proxy mode and before the first sync).
    pub services: Vec<ServiceInfo>,
}

/// One Service as the datapath translates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub frontends: Vec<FrontendInfo>,
}

/// One frontend: `address:port/protocol`, its id and backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendInfo {
    pub address: std::net::Ipv4Addr,
    pub port: u16,
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    /// The Service port's name (empty for an only, unnamed port).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
    /// The frontend id in the maps (`None`: not written, see `in_datapath`).
    pub id: Option<u32>,
    /// `sessionAffinity: ClientIP`'s timeout in seconds; 0: none.
    pub affinity_timeout_s: u32,
    /// Backend slots 1..=n in order, `address:port`.
    pub backends: Vec<String>,
    /// The maps hold this frontend with all its backends.
    pub in_datapath: bool,
}

impl fmt::Display for ServicesAnswer {
    /// `podnetctl services`: a line per frontend, its backends after it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mode {}", self.status.summary())?;
        if self.services.is_empty() {
            return Ok(());
        }
        writeln!(
            f,
            "{:<32} {:<24} {:>6} {:<10} BACKENDS",
            "SERVICE", "FRONTEND", "ID", "AFFINITY"
        )?;
        for service in &self.services {
            for frontend in &service.frontends {
                let name = format!("{}/{}", service.namespace, service.name);
                let address = format!(
                    "{}:{}/{}",
                    frontend.address, frontend.port, frontend.protocol
                );
                let id = frontend
                    .id
                    .map_or_else(|| "-".to_owned(), |id| id.to_string());
                let affinity = if frontend.affinity_timeout_s == 0 {
                    "-".to_owned()
                } else {
                    format!("{}s", frontend.affinity_timeout_s)
                };
                let backends = if frontend.backends.is_empty() {
                    "(none: connections refused)".to_owned()
                } else {
                    frontend.backends.join(", ")
                };
                let missing = if frontend.in_datapath {
                    ""
                } else {
                    "  NOT IN THE DATAPATH"
                };
                writeln!(
                    f,
                    "{name:<32} {address:<24} {id:>6} {affinity:<10} {backends}{missing}"
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_spelled_as_the_flag() {
        assert_eq!(
            serde_json::to_string(&ServicesMode::KubeProxy).expect("encodes"),
            "\"kube-proxy\""
        );
        assert_eq!(
            serde_json::from_str::<ServicesMode>("\"bpf\"").expect("decodes"),
            ServicesMode::Bpf
        );
        let names: Vec<String> = <ServicesMode as clap::ValueEnum>::value_variants()
            .iter()
            .filter_map(|v| clap::ValueEnum::to_possible_value(v).map(|p| p.get_name().to_owned()))
            .collect();
        assert_eq!(names, ["bpf", "kube-proxy"]);
        assert_eq!(ServicesMode::default(), ServicesMode::KubeProxy);
    }

    #[test]
    fn the_status_line_says_what_is_wrong_in_capitals() {
        assert!(
            ServicesStatus::default()
                .summary()
                .starts_with("kube-proxy")
        );
        let fine = ServicesStatus {
            mode: ServicesMode::Bpf,
            synced: true,
            services: 2,
            frontends: 3,
            backends: 5,
            syncs: 4,
            last_sync_ms: 1,
            ..ServicesStatus::default()
        };
        assert_eq!(
            fine.summary(),
            "bpf: 3 frontend(s) of 2 Service(s), 5 backend(s); 4 sync(s), last 1 ms"
        );
        let full = ServicesStatus {
            refused: 2,
            incomplete: 1,
            last_error: Some("map podnet_svcbe: inserting".into()),
            ..fine
        };
        let line = full.summary();
        assert!(line.contains("2 ENTRIES REFUSED"), "{line}");
        assert!(line.contains("1 FRONTEND(S) INCOMPLETE"), "{line}");
        assert!(line.ends_with("map podnet_svcbe: inserting"), "{line}");
        let starting = ServicesStatus {
            mode: ServicesMode::Bpf,
            ..ServicesStatus::default()
        };
        assert!(starting.summary().contains("NOT SYNCED"));
    }

    #[test]
    fn the_listing_has_a_line_per_frontend() {
        let answer = ServicesAnswer {
            status: ServicesStatus {
                mode: ServicesMode::Bpf,
                synced: true,
                ..ServicesStatus::default()
            },
            services: vec![ServiceInfo {
                namespace: "x".into(),
                name: "web".into(),
                frontends: vec![
                    FrontendInfo {
                        address: [10, 96, 0, 10].into(),
                        port: 80,
                        protocol: "tcp".into(),
                        port_name: "http".into(),
                        id: Some(1),
                        affinity_timeout_s: 10800,
                        backends: vec!["10.244.0.5:8080".into(), "10.244.1.5:8080".into()],
                        in_datapath: true,
                    },
                    FrontendInfo {
                        address: [10, 96, 0, 10].into(),
                        port: 53,
                        protocol: "udp".into(),
                        port_name: String::new(),
                        id: None,
                        affinity_timeout_s: 0,
                        backends: vec![],
                        in_datapath: false,
                    },
                ],
            }],
        };
        let text = answer.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("SERVICE"), "{text}");
        assert!(
            lines[2].contains("10.96.0.10:80/tcp")
                && lines[2].contains("10800s")
                && lines[2].ends_with("10.244.0.5:8080, 10.244.1.5:8080"),
            "{text}"
        );
        assert!(
            lines[3].contains("(none: connections refused)")
                && lines[3].ends_with("NOT IN THE DATAPATH"),
            "{text}"
        );
    }
}
