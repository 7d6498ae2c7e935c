//! The wire types of the agent's NetworkPolicy: its sync's status (in
//! `podnetctl status`) and the answers of `podnetctl policy`.

use serde::{Deserialize, Serialize};

/// What `podnetctl status` and the metrics show of the policy sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The maps were written from a full view of the cluster at least once
    /// by this agent.
    pub synced: bool,
    /// Local endpoints selected for ingress / egress.
    pub ingress_selected: usize,
    pub egress_selected: usize,
    /// Pod identities (label sets) and addresses with an identity.
    pub identities: usize,
    pub addresses: usize,
    /// Entries of the rules and CIDR-set tries.
    pub rules: usize,
    pub cidrs: usize,
    /// Syncs done, and how long the last one took (compile and writes).
    pub syncs: u64,
    pub last_sync_ms: u64,
    /// Entries a map refused in the last sync (a full map): the endpoints
    /// they were for deny what those entries would allow.
    pub refused: u64,
    /// Why the last sync failed or was incomplete, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl PolicyStatus {
    /// One line for `podnetctl status`.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{} pod(s) isolated for ingress, {} for egress; {} identities over {} addresses; {} rule entries, {} CIDR entries; {} sync(s), last {} ms",
            self.ingress_selected,
            self.egress_selected,
            self.identities,
            self.addresses,
            self.rules,
            self.cidrs,
            self.syncs,
            self.last_sync_ms
        );
        if !self.synced {
            line.push_str("; NOT SYNCED (the pinned maps hold the last agent's policy)");
        }
        if self.refused > 0 {
            line.push_str("; ");
            line.push_str(&self.refused.to_string());
            line.push_str(
                " ENTRIES REFUSED (a map is full: the pods they were for deny more than their policies say)",
            );
        }
        if let Some(e) = &self.last_error {
            line.push_str("; ");
            line.push_str(e);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::PolicyStatus;

    #[test]
    fn a_refused_entry_and_a_sync_not_done_are_said_in_capitals() {
        let fine = PolicyStatus {
            synced: true,
            ingress_selected: 2,
            ..PolicyStatus::default()
        };
        let line = fine.summary();
        assert!(line.starts_with("2 pod(s) isolated for ingress"), "{line}");
        assert!(
            !line.contains("REFUSED") && !line.contains("NOT SYNCED"),
            "{line}"
        );
        let full = PolicyStatus {
            refused: 3,
            last_error: Some("map podnet_policy: inserting".to_owned()),
            ..fine.clone()
        };
        let line = full.summary();
        assert!(line.contains("3 ENTRIES REFUSED"), "{line}");
        assert!(line.contains("map podnet_policy"), "{line}");
        let starting = PolicyStatus::default();
        assert!(starting.summary().contains("NOT SYNCED"));
    }
}
