//! How full the datapath's bounded tables of flows are, as `podnetctl
//! status` shows them: the connection table (NetworkPolicy's connection
//! tracking and Service translation) and the stack-flows table. Both are
//! LRU maps: a full one does not refuse a new entry, it evicts the least
//! recently used one, so a table near its capacity is about to lose
//! established connections, and the counters that show the consequence
//! are named with it.

use podnet_common::{DropReason, names};
use serde::{Deserialize, Serialize};

/// From this fill on a table is flagged (`NEARLY FULL`, `nearly_full`):
/// an LRU hash evicts before it is exactly full (its free lists are per
/// CPU), and a table that full is one burst of new flows away from
/// evicting live ones.
pub const NEARLY_FULL_PERCENT: u64 = 90;

/// The tables shown, in order: (pinned map, what it holds).
pub const TABLES: [(&str, &str); 2] = [
    (names::MAP_CONNTRACK, "connections"),
    (names::MAP_STACK_FLOWS, "stack flows"),
];

/// One table's fill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableFill {
    /// What it holds: `connections`, `stack flows`.
    pub table: String,
    /// The pinned map (`podnet_conntrk`, `podnet_stackflw`).
    pub map: String,
    /// Entries counted in the map (both directions of a connection are
    /// two).
    pub entries: u32,
    /// The map's capacity.
    pub capacity: u32,
    /// At least [`NEARLY_FULL_PERCENT`] full: the LRU evicts the oldest
    /// entries from here on.
    pub nearly_full: bool,
}

impl TableFill {
    #[must_use]
    pub fn new(table: &str, map: &str, entries: u32, capacity: u32) -> Self {
        Self {
            table: table.to_owned(),
            map: map.to_owned(),
            entries,
            capacity,
            // Integer arithmetic: exactly 90 % is flagged, 89.99 % is not.
            nearly_full: capacity > 0
                && u64::from(entries) * 100 >= u64::from(capacity) * NEARLY_FULL_PERCENT,
        }
    }

    /// Entries in percent of the capacity (0 for a map without one).
    #[must_use]
    pub fn percent(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        f64::from(self.entries) * 100.0 / f64::from(self.capacity)
    }

    /// Where the consequence of evictions shows, for a table of `map`.
    #[must_use]
    pub fn evictions_show_in(map: &str) -> String {
        match map {
            names::MAP_CONNTRACK => format!(
                "an evicted Service connection's next segment is dropped ({}), an evicted \
                 policy connection's next packet is judged as new ({} / {} for its replies)",
                DropReason::ServiceConnectionUnknown.name(),
                DropReason::PolicyDeniedIngress.name(),
                DropReason::PolicyDeniedEgress.name(),
            ),
            names::MAP_STACK_FLOWS => "an evicted flow's replies skip the stack's conntrack \
                                       (NAT not undone): see podnetctl flows --owners"
                .to_owned(),
            _ => "see podnetctl counters".to_owned(),
        }
    }

    /// The line of `podnetctl status` (after the table's name).
    #[must_use]
    pub fn summary(&self) -> String {
        let fill = format!(
            "{} / {} entries ({:.1} %, {})",
            self.entries,
            self.capacity,
            self.percent(),
            self.map
        );
        if self.nearly_full {
            format!(
                "{fill} NEARLY FULL: the LRU evicts the oldest entries; {}",
                Self::evictions_show_in(&self.map)
            )
        } else {
            fill
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ninety_percent_is_nearly_full_and_just_below_is_not() {
        let capacity = names::MAX_TRACKED_CONNECTIONS;
        // 235,929.6 is 90 %: 235,929 is below, 235,930 at or above.
        let below = TableFill::new("connections", names::MAP_CONNTRACK, 235_929, capacity);
        let at = TableFill::new("connections", names::MAP_CONNTRACK, 235_930, capacity);
        assert!(!below.nearly_full);
        assert!(at.nearly_full);
        assert!(TableFill::new("t", "m", 90, 100).nearly_full);
        assert!(!TableFill::new("t", "m", 89, 100).nearly_full);
        assert!(TableFill::new("t", "m", 100, 100).nearly_full);
        assert!(TableFill::new("t", "m", u32::MAX, u32::MAX).nearly_full);
    }

    #[test]
    fn a_map_without_capacity_is_empty_not_full() {
        let fill = TableFill::new("t", "m", 0, 0);
        assert!(!fill.nearly_full);
        assert!(fill.percent().abs() < f64::EPSILON);
    }

    #[test]
    fn the_line_says_how_full_and_where_evictions_show() {
        let quiet = TableFill::new("connections", names::MAP_CONNTRACK, 1_311, 262_144);
        assert_eq!(
            quiet.summary(),
            "1311 / 262144 entries (0.5 %, podnet_conntrk)"
        );
        let full = TableFill::new("connections", names::MAP_CONNTRACK, 250_000, 262_144);
        let line = full.summary();
        assert!(
            line.contains("(95.4 %, podnet_conntrk) NEARLY FULL"),
            "{line}"
        );
        assert!(line.contains("service_connection_unknown"), "{line}");
        assert!(line.contains("policy_denied_ingress"), "{line}");
        let flows = TableFill::new("stack flows", names::MAP_STACK_FLOWS, 131_072, 131_072);
        let line = flows.summary();
        assert!(line.contains("100.0 %"), "{line}");
        assert!(line.contains("podnetctl flows --owners"), "{line}");
    }

    #[test]
    fn the_json_names_the_flag() {
        let fill = TableFill::new("stack flows", names::MAP_STACK_FLOWS, 120_000, 131_072);
        let json = serde_json::to_value(&fill).expect("json");
        assert_eq!(json["nearly_full"], true);
        assert_eq!(json["entries"], 120_000);
        assert_eq!(json["capacity"], 131_072);
        assert_eq!(json["map"], "podnet_stackflw");
    }
}
