//! Who is in the cluster when nodes come and go: "unreachable" (its lease
//! expired, it may be restarting, rebooting or cut off) versus "gone" (away
//! for longer than the grace period), and when a gone node's pod CIDR may
//! be handed to someone else.
//!
//! Everything here is a pure function of a [`Snapshot`] of the datastore and
//! the time, so every agent that reads the same snapshot decides the same;
//! the etcd backend carries the decisions out with transactions that re-check
//! what the decision was based on (see [`super::etcd`]).
//!
//! # Why a lease expiry does not remove a node at once
//!
//! A node's liveness key lives under a lease of a few seconds (the lease
//! TTL). The lease expires whenever the agent is not there to renew it: an
//! agent restart, an upgrade, a crash loop, a node reboot, a network cut
//! between the node and etcd. In all of these the node's pods keep running
//! and its datapath keeps forwarding from its pins, so removing its routes
//! everywhere cuts off pods that are fine (measured before this change: 693
//! of 1,208 pings lost with an agent stopped for 25 s at TTL 10 s). So a
//! node whose lease has expired is only **unreachable**: every other node
//! keeps its routes for the grace period, and a node that comes back within
//! it changes nothing (same record, no route flap). After the grace period
//! it is **gone**: routes and map entries are removed. Its pod CIDR stays
//! claimed for much longer (`cidr_release_after`), so a node that returns
//! late gets its own CIDR (and its pods their addresses) back, and is only
//! released once nobody could plausibly be using it.
//!
//! # How "gone since" is known by every agent, across restarts
//!
//! An agent that sees a node without its liveness key writes a tombstone
//! under its own name, `/podnet/gone/<observer>/<name>`, holding the
//! wall-clock time it saw that (a transaction that also checks the
//! liveness key is still absent, so a node that just came back is never
//! tombstoned). Only a node's *witnesses* write one and only theirs count:
//! the (up to [`WITNESSES`]) live nodes that claimed their place before the
//! node last published itself, oldest first (they were there to see it
//! leave; a node that joined later would restart the clock). "Gone since"
//! is the latest of the witnesses' times that is not older than the node's
//! last publish, so every agent, including one that started a minute ago,
//! reads the same time from etcd and applies its own grace period to it.
//! Each witness removes its own tombstone when the node is live again.
//!
//! Why one key per observer and the latest time: with etcd roles a node
//! writes only keys of its own, so a compromised node cannot write or
//! delete another's tombstone; writing an early time of its own does not
//! make a restarting node gone early while an honest witness has written a
//! later one (the latest counts), and its tombstones count not at all
//! unless it is a witness. What it can still do as a witness is write a
//! later time, which keeps a node that left routed (to an address nobody
//! answers) and its CIDR claimed for longer: a delay, not a takeover.
//!
//! Alternatives considered: etcd revisions carry no time, so "gone for ten
//! minutes" cannot be read from them; a second lease with the grace period
//! as TTL would time the grace on etcd's clock, but a lease's TTL is fixed
//! when it is granted (agents could not each configure theirs), and etcd
//! extends every lease on a leader change, so a flapping etcd would postpone
//! it without bound. Clock skew between agents shifts the moment by the skew
//! (seconds, against a grace of minutes and a release after a day).
//!
//! A node's record is kept apart from its liveness key (`/podnet/members/
//! <name>`, no lease) because the liveness key is deleted by etcd when the
//! lease expires: without a durable copy, an agent that restarts while a
//! node is unreachable would not know where that node's pods are.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use ipnet::Ipv4Net;

use super::NodeRecord;

/// What the agents agree on about nodes that went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long routes to a node whose lease expired are kept.
    pub node_grace_period: Duration,
    /// How long after its lease expired a node's pod CIDR claim is
    /// released (never shorter than the grace period).
    pub cidr_release_after: Duration,
}

impl Policy {
    /// Ten minutes: longer than a node reboot, an agent upgrade, and the
    /// longest pause of a crash loop under a kubelet (its restart back-off
    /// is capped at five minutes), so none of these ever flap a route; and
    /// not much longer than Kubernetes takes to evict the pods of an
    /// unreachable node (five minutes by default), after which nobody should
    /// send to them anyway.
    pub const DEFAULT_NODE_GRACE_PERIOD: Duration = Duration::from_mins(10);
    /// A day: a node that is powered off over a night still gets its CIDR
    /// back; the cost is one /24 out of the cluster CIDR per node that really
    /// left, held for a day (a cluster that churns more nodes than its CIDR
    /// holds per day should shorten it).
    pub const DEFAULT_CIDR_RELEASE_AFTER: Duration = Duration::from_hours(24);

    /// A policy, refused when the claim would be released before the
    /// routes are removed (another node could then get a CIDR that others
    /// still route to the old one).
    pub fn new(node_grace_period: Duration, cidr_release_after: Duration) -> Result<Self, String> {
        if cidr_release_after < node_grace_period {
            return Err(format!(
                "the CIDR release delay ({}) must not be shorter than the node grace period ({})",
                format_duration(cidr_release_after),
                format_duration(node_grace_period)
            ));
        }
        Ok(Self {
            node_grace_period,
            cidr_release_after,
        })
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            node_grace_period: Self::DEFAULT_NODE_GRACE_PERIOD,
            cidr_release_after: Self::DEFAULT_CIDR_RELEASE_AFTER,
        }
    }
}

/// Parses `90`, `90s`, `500ms`, `10m`, `24h`, `2d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 10m, 24h)"))?;
    let seconds = |factor: u64| {
        n.checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => Err(format!(
            "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
        )),
    }
}

/// The shortest exact way to write `d` with [`parse_duration`]'s units.
#[must_use]
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// A node's tombstone: since when it has been without a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tombstone {
    /// Seconds since the Unix epoch, on the clock of the agent that saw it.
    pub since: u64,
    /// The tombstone key's modification revision: a transaction acting on
    /// this tombstone checks that it is still this one.
    pub mod_revision: i64,
}

/// The cluster as one read of the datastore saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The datastore revision of this read (watch from the next one).
    pub revision: i64,
    /// Nodes whose lease is alive, with the record under the lease.
    pub live: BTreeMap<String, NodeRecord>,
    /// Every node's durable record.
    pub members: BTreeMap<String, NodeRecord>,
    /// Tombstones of nodes seen without a lease: node -> observer (the
    /// node that wrote it) -> tombstone. Observer [`LEGACY_OBSERVER`] is a
    /// tombstone from before observers kept their own: cleared when its
    /// node is live, never counted. [`Snapshot::tombstone`] is what they
    /// mean.
    pub tombstones: BTreeMap<String, BTreeMap<String, Tombstone>>,
    /// When each node last published itself, as the modification
    /// revision of its durable record.
    pub published: BTreeMap<String, i64>,
    /// Pod CIDR claims: CIDR -> the node holding it (see [`decide_claims`]).
    pub claims: BTreeMap<Ipv4Net, String>,
    /// When each node first claimed its place, as a datastore revision:
    /// the creation revision of its durable record (of its liveness record
    /// when it has none). A node's own later writes keep it; only the
    /// datastore assigns it, so a record written later cannot claim to be
    /// older. Conflicts between records are decided by it: the incumbent
    /// holds. A name missing here counts as the newest.
    pub order: BTreeMap<String, i64>,
    /// Keys whose value could not be read (logged, otherwise ignored).
    pub invalid: Vec<String>,
}

/// The observer of a tombstone written before observers kept their own
/// (`gone/<name>`).
pub const LEGACY_OBSERVER: &str = "";

/// How many witnesses a node has (see the module doc): enough that one
/// compromised or stopped node among them changes nothing, few enough
/// that a node going away costs a few writes, not one per node of the
/// cluster.
pub const WITNESSES: usize = 3;

impl Snapshot {
    fn order_of(&self, name: &str) -> i64 {
        self.order.get(name).copied().unwrap_or(i64::MAX)
    }

    /// The nodes whose tombstones of `name` count: the oldest live nodes
    /// (claim order) that claimed before `name` last published itself,
    /// and while there are fewer than [`WITNESSES`] of those, the oldest
    /// of the live nodes that came later (one compromised node that was
    /// there is never the only witness when others could be).
    #[must_use]
    pub fn witnesses(&self, name: &str) -> Vec<&str> {
        let mut live: Vec<&str> = self
            .live
            .keys()
            .map(String::as_str)
            .filter(|n| *n != name)
            .collect();
        let last_published = self.published.get(name).copied();
        let came_later = |n: &str| last_published.is_none_or(|p| self.order_of(n) >= p);
        live.sort_by_key(|n| (came_later(n), self.order_of(n), *n));
        live.truncate(WITNESSES);
        live
    }

    /// `name`'s tombstone as every agent reads it: the latest of its
    /// witnesses' that is not older than its last publish (one from an
    /// earlier absence, left by a witness that was away when it came
    /// back, says nothing about this one).
    #[must_use]
    pub fn tombstone(&self, name: &str) -> Option<Tombstone> {
        let theirs = self.tombstones.get(name)?;
        let last_published = self.published.get(name).copied().unwrap_or(0);
        self.witnesses(name)
            .into_iter()
            .filter_map(|w| theirs.get(w))
            .filter(|t| t.mod_revision > last_published)
            .max_by_key(|t| (t.since, t.mod_revision))
            .copied()
    }

    /// Whether `observer` has a tombstone of `name` that counts.
    fn has_own_tombstone(&self, observer: &str, name: &str) -> bool {
        let last_published = self.published.get(name).copied().unwrap_or(0);
        self.tombstones
            .get(name)
            .and_then(|t| t.get(observer))
            .is_some_and(|t| t.mod_revision > last_published)
    }
}

/// Who holds each pod CIDR: the node whose claim on it is the oldest.
/// Claims are the nodes' claim-order keys (`held`: (node, CIDR) -> the
/// datastore revision that created it, which only the datastore assigns)
/// and the shared claim keys of agents from before them (`legacy`: CIDR ->
/// (node, creation revision)). Of a node's claim-order keys only two
/// count: the one for the CIDR its record announces (the live record's,
/// else the durable one's) and its newest (a node between claim and
/// publish); so a node writing keys under its own prefix cannot hold more
/// of the cluster's CIDRs than that.
#[must_use]
pub fn decide_claims(
    held: &BTreeMap<(String, Ipv4Net), i64>,
    legacy: &BTreeMap<Ipv4Net, (String, i64)>,
    live: &BTreeMap<String, NodeRecord>,
    members: &BTreeMap<String, NodeRecord>,
) -> BTreeMap<Ipv4Net, String> {
    let mut newest: BTreeMap<&str, (i64, Ipv4Net)> = BTreeMap::new();
    for ((name, cidr), at) in held {
        let entry = newest.entry(name.as_str()).or_insert((*at, *cidr));
        if *at > entry.0 {
            *entry = (*at, *cidr);
        }
    }
    let counts = |name: &str, cidr: Ipv4Net| {
        let announced = live
            .get(name)
            .or_else(|| members.get(name))
            .is_some_and(|r| r.pod_cidr == cidr);
        announced || newest.get(name).is_some_and(|(_, c)| *c == cidr)
    };
    let mut oldest: BTreeMap<Ipv4Net, (i64, &str)> = BTreeMap::new();
    let claims = held
        .iter()
        .filter(|((name, cidr), _)| counts(name, *cidr))
        .map(|((name, cidr), at)| (*cidr, *at, name.as_str()))
        .chain(
            legacy
                .iter()
                .map(|(cidr, (name, at))| (*cidr, *at, name.as_str())),
        );
    for (cidr, at, name) in claims {
        let entry = oldest.entry(cidr).or_insert((at, name));
        if (at, name) < *entry {
            *entry = (at, name);
        }
    }
    oldest
        .into_iter()
        .map(|(cidr, (_, name))| (cidr, name.to_owned()))
        .collect()
}

pub use crate::model::{NodeState, NodeStatus};

/// A gone node's claims to release, and what the decision was based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub name: String,
    /// The CIDRs the node held (normally one; none when only its record is
    /// left).
    pub cidrs: Vec<Ipv4Net>,
    /// Every tombstone of the node (observer, modification revision): the
    /// release happens only if none changed, and removes them all.
    pub tombstones: Vec<(String, i64)>,
}

/// What to do about a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The nodes to route to: live ones first (a live node wins a conflict
    /// over one that is away, e.g. a new node that got the old one's
    /// address), then unreachable ones that still hold their CIDR; each in
    /// claim order ([`Snapshot::order`]). A record whose pod CIDR overlaps
    /// that of a node that claimed earlier is left out, live or not: the
    /// incumbent holds (a record written later, say `0evil` with node2's
    /// CIDR, must not take node2's pods' traffic, whatever its name).
    pub routed: Vec<NodeRecord>,
    /// Every node with a record, and where it stands.
    pub nodes: Vec<NodeStatus>,
    /// Nodes without a lease that this node witnesses (see
    /// [`Snapshot::witnesses`]) and has no tombstone of: write one now.
    pub mark_gone: Vec<String>,
    /// This node's tombstones (and tombstones from before observers kept
    /// their own) of nodes that are live again: remove them. (name,
    /// observer, tombstone revision)
    pub clear_tombstones: Vec<(String, String, i64)>,
    /// Claims to release.
    pub releases: Vec<Release>,
    /// When a node's state next changes with time alone (none: only a
    /// datastore change can change anything).
    pub next_check: Option<Duration>,
}

/// Decides, at `now` (Unix seconds), what `snapshot` means under `policy`
/// for node `me` (never marked gone or released by itself; `None` for a
/// tool that is no node).
#[must_use]
pub fn plan(snapshot: &Snapshot, policy: Policy, me: Option<&str>, now: u64) -> Plan {
    let grace = policy.node_grace_period.as_secs();
    let release = policy.cidr_release_after.as_secs();
    let mut plan = Plan::default();
    let mut next: Option<u64> = None;
    let mut soonest = |at: u64| {
        if at > now {
            let wait = at - now;
            next = Some(next.map_or(wait, |n| n.min(wait)));
        }
    };

    let order = |name: &str| snapshot.order.get(name).copied().unwrap_or(i64::MAX);
    let mut live: Vec<(&String, &NodeRecord)> = snapshot.live.iter().collect();
    live.sort_by_key(|(name, _)| (order(name), name.as_str()));
    let mut unreachable: Vec<NodeRecord> = Vec::new();
    for (name, record) in live {
        plan.routed.push(record.clone());
        plan.nodes.push(NodeStatus {
            record: record.clone(),
            state: NodeState::Live,
            since: None,
            routed: true,
        });
        for (observer, tomb) in snapshot.tombstones.get(name).into_iter().flatten() {
            if Some(observer.as_str()) == me || observer == LEGACY_OBSERVER {
                plan.clear_tombstones
                    .push((name.clone(), observer.clone(), tomb.mod_revision));
            }
        }
    }

    // Everyone who holds something (a record or a claim) but no lease.
    let holders: BTreeSet<&String> = snapshot
        .members
        .keys()
        .chain(snapshot.claims.values())
        .chain(snapshot.tombstones.keys())
        .filter(|name| !snapshot.live.contains_key(*name))
        .collect();
    for name in holders {
        if Some(name.as_str()) == me {
            continue;
        }
        // A witness without a tombstone of its own writes one now, and
        // counts it already: another's earlier time does not make the node
        // gone in the meantime.
        let marking = me.is_some_and(|me| {
            !snapshot.has_own_tombstone(me, name) && snapshot.witnesses(name).contains(&me)
        });
        if marking {
            plan.mark_gone.push(name.clone());
        }
        let tomb = snapshot.tombstone(name);
        let since = match tomb {
            Some(t) if !marking => t.since,
            Some(t) => t.since.max(now),
            None => now,
        };
        let away = now.saturating_sub(since);
        let claimed: Vec<Ipv4Net> = snapshot
            .claims
            .iter()
            .filter(|(_, holder)| *holder == name)
            .map(|(cidr, _)| *cidr)
            .collect();
        if let Some(record) = snapshot.members.get(name) {
            let state = if away < grace {
                NodeState::Unreachable
            } else {
                NodeState::Gone
            };
            // Only while it holds its CIDR (see `still_holds`): a CIDR that
            // was released and claimed again is not this node's.
            let holds = claimed.contains(&record.pod_cidr) || still_holds(snapshot, name, record);
            let routed = state == NodeState::Unreachable && holds;
            if routed {
                unreachable.push(record.clone());
            }
            plan.nodes.push(NodeStatus {
                record: record.clone(),
                state,
                since: Some(since),
                routed,
            });
            soonest(since.saturating_add(grace));
        }
        match tomb {
            Some(_) if away >= release => plan.releases.push(Release {
                name: name.clone(),
                cidrs: claimed,
                tombstones: snapshot
                    .tombstones
                    .get(name)
                    .into_iter()
                    .flatten()
                    .map(|(observer, t)| (observer.clone(), t.mod_revision))
                    .collect(),
            }),
            _ => soonest(since.saturating_add(release)),
        }
    }
    unreachable.sort_by_key(|r| (order(&r.name), r.name.clone()));
    plan.routed.extend(unreachable);
    refuse_later_claims(&mut plan, order);
    plan.next_check = next.map(Duration::from_secs);
    plan
}

/// Whether a node without a lease whose claim does not name it still holds
/// its CIDR: the claim keys are shared bookkeeping every node may write, so
/// a claim rewritten (or deleted) by another node does not take the CIDR
/// from one that published it first. A node without claim order (an agent
/// from before it) goes by its claim alone.
fn still_holds(snapshot: &Snapshot, name: &str, record: &NodeRecord) -> bool {
    let Some(mine) = snapshot.order.get(name) else {
        return false;
    };
    snapshot.claims.get(&record.pod_cidr).is_none_or(|holder| {
        let theirs = snapshot
            .live
            .get(holder)
            .or_else(|| snapshot.members.get(holder))
            .filter(|r| r.pod_cidr == record.pod_cidr)
            .and_then(|_| snapshot.order.get(holder));
        theirs.is_none_or(|theirs| mine < theirs)
    })
}

/// The incumbent holds its pod CIDR against any record that claimed
/// later, live or not: those are taken out of `plan.routed`.
fn refuse_later_claims(plan: &mut Plan, order: impl Fn(&str) -> i64) {
    let mut by_claim: Vec<&NodeRecord> = plan.routed.iter().collect();
    by_claim.sort_by_key(|r| (order(&r.name), r.name.as_str()));
    let mut held: Vec<&NodeRecord> = Vec::new();
    let mut refused: BTreeSet<String> = BTreeSet::new();
    for record in by_claim {
        if held.iter().any(|h| overlap(h.pod_cidr, record.pod_cidr)) {
            refused.insert(record.name.clone());
        } else {
            held.push(record);
        }
    }
    plan.routed.retain(|r| !refused.contains(&r.name));
    for status in &mut plan.nodes {
        if refused.contains(&status.record.name) {
            status.routed = false;
        }
    }
}

fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// What is wrong with a set of claims and live records, if anything: a node
/// holding two CIDRs, two claims overlapping, a live node announcing a CIDR
/// that is not claimed by it, or two live nodes announcing overlapping
/// CIDRs. Empty when the CIDRs are each held once.
#[must_use]
pub fn claim_problems(snapshot: &Snapshot) -> Vec<String> {
    let mut problems = Vec::new();
    let mut held: BTreeMap<&str, Vec<Ipv4Net>> = BTreeMap::new();
    for (cidr, name) in &snapshot.claims {
        held.entry(name).or_default().push(*cidr);
    }
    for (name, cidrs) in &held {
        if cidrs.len() > 1 {
            problems.push(format!("{name} holds {} claims: {cidrs:?}", cidrs.len()));
        }
    }
    let claims: Vec<(&Ipv4Net, &String)> = snapshot.claims.iter().collect();
    for (i, (a, a_name)) in claims.iter().enumerate() {
        for (b, b_name) in &claims[i + 1..] {
            if a.contains(&b.network()) || b.contains(&a.network()) {
                problems.push(format!("claims {a} ({a_name}) and {b} ({b_name}) overlap"));
            }
        }
    }
    for (name, record) in &snapshot.live {
        if snapshot.claims.get(&record.pod_cidr) != Some(name) {
            problems.push(format!(
                "{name} announces {} but the claim names {}",
                record.pod_cidr,
                snapshot
                    .claims
                    .get(&record.pod_cidr)
                    .map_or("nobody", String::as_str)
            ));
        }
    }
    let live: Vec<&NodeRecord> = snapshot.live.values().collect();
    for (i, a) in live.iter().enumerate() {
        for b in &live[i + 1..] {
            if a.pod_cidr.contains(&b.pod_cidr.network())
                || b.pod_cidr.contains(&a.pod_cidr.network())
            {
                problems.push(format!(
                    "live nodes {} ({}) and {} ({}) overlap",
                    a.name, a.pod_cidr, b.name, b.pod_cidr
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;
    const NOW: u64 = 1_800_000_000;

    fn record(name: &str, third: u8) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            node_ip: std::net::Ipv4Addr::new(192, 168, 100, 10 + third),
            pod_cidr: Ipv4Net::new(std::net::Ipv4Addr::new(10, 244, third, 0), 24).expect("cidr"),
        }
    }

    /// A cluster where `live` nodes hold a lease and `away` nodes (name,
    /// seconds since their tombstone, or None for no tombstone yet) do not;
    /// every node has a record and a claim.
    fn snapshot(live: &[&str], away: &[(&str, Option<u64>)]) -> Snapshot {
        let mut s = Snapshot {
            revision: 100,
            ..Snapshot::default()
        };
        let names = live.iter().copied().chain(away.iter().map(|(n, _)| *n));
        for (i, name) in names.enumerate() {
            let r = record(name, u8::try_from(i + 1).expect("small"));
            // Claimed in the order listed.
            s.order
                .insert((*name).to_owned(), 10 + i64::try_from(i).expect("small"));
            s.claims.insert(r.pod_cidr, (*name).to_owned());
            s.members.insert((*name).to_owned(), r.clone());
            if live.contains(&name) {
                s.live.insert((*name).to_owned(), r);
            }
        }
        // Written by the first live node (a witness of every other).
        let observer = live.first().copied().unwrap_or("me");
        for (i, (name, ago)) in away.iter().enumerate() {
            if let Some(ago) = ago {
                tombstone(
                    &mut s,
                    name,
                    observer,
                    Tombstone {
                        since: NOW - ago,
                        mod_revision: 50 + i64::try_from(i).expect("small"),
                    },
                );
            }
        }
        s
    }

    fn tombstone(s: &mut Snapshot, name: &str, observer: &str, t: Tombstone) {
        s.tombstones
            .entry(name.to_owned())
            .or_default()
            .insert(observer.to_owned(), t);
    }

    fn policy(grace_min: u64, release_min: u64) -> Policy {
        Policy::new(
            Duration::from_secs(grace_min * MIN),
            Duration::from_secs(release_min * MIN),
        )
        .expect("policy")
    }

    fn routed(plan: &Plan) -> Vec<&str> {
        plan.routed.iter().map(|r| r.name.as_str()).collect()
    }

    fn state(plan: &Plan, name: &str) -> NodeState {
        plan.nodes
            .iter()
            .find(|n| n.record.name == name)
            .expect("listed")
            .state
    }

    #[test]
    fn a_node_whose_lease_just_expired_is_still_routed_and_gets_a_tombstone() {
        let s = snapshot(&["me", "n2"], &[("n3", None)]);
        let p = plan(&s, Policy::default(), Some("me"), NOW);
        assert_eq!(routed(&p), ["me", "n2", "n3"]);
        assert_eq!(state(&p, "n3"), NodeState::Unreachable);
        assert_eq!(p.mark_gone, ["n3"]);
        assert!(p.releases.is_empty());
        assert_eq!(p.next_check, Some(Policy::DEFAULT_NODE_GRACE_PERIOD));
    }

    #[test]
    fn routes_stay_for_the_grace_period_then_go_and_the_claim_is_released_later() {
        let p = policy(10, 24 * 60);
        let within = plan(
            &snapshot(&["me"], &[("n2", Some(9 * MIN))]),
            p,
            Some("me"),
            NOW,
        );
        assert_eq!(routed(&within), ["me", "n2"]);
        assert_eq!(state(&within, "n2"), NodeState::Unreachable);
        assert!(
            within.mark_gone.is_empty(),
            "the tombstone is there already"
        );
        assert_eq!(within.next_check, Some(Duration::from_secs(MIN)));

        let after = plan(
            &snapshot(&["me"], &[("n2", Some(10 * MIN))]),
            p,
            Some("me"),
            NOW,
        );
        assert_eq!(routed(&after), ["me"], "gone after the grace period");
        assert_eq!(state(&after, "n2"), NodeState::Gone);
        assert!(after.releases.is_empty(), "the claim is kept for a day");
        assert_eq!(
            after.next_check,
            Some(Duration::from_secs(24 * 60 * MIN - 10 * MIN))
        );

        let s = snapshot(&["me"], &[("n2", Some(24 * 60 * MIN))]);
        let day = plan(&s, p, Some("me"), NOW);
        assert_eq!(routed(&day), ["me"]);
        assert_eq!(
            day.releases,
            [Release {
                name: "n2".into(),
                cidrs: vec![s.members["n2"].pod_cidr],
                tombstones: vec![("me".into(), s.tombstones["n2"]["me"].mod_revision)],
            }]
        );
    }

    #[test]
    fn a_live_node_is_never_released_whatever_its_tombstone_says() {
        let mut s = snapshot(&["me", "n2"], &[]);
        tombstone(
            &mut s,
            "n2",
            "me",
            Tombstone {
                since: NOW - 365 * 24 * 60 * MIN,
                mod_revision: 7,
            },
        );
        // Another observer's is that observer's to remove.
        tombstone(
            &mut s,
            "n2",
            "n3",
            Tombstone {
                since: NOW,
                mod_revision: 8,
            },
        );
        let p = plan(&s, policy(1, 1), Some("me"), NOW);
        assert_eq!(routed(&p), ["me", "n2"]);
        assert!(p.releases.is_empty());
        assert_eq!(p.clear_tombstones, [("n2".to_owned(), "me".to_owned(), 7)]);
    }

    #[test]
    fn this_node_never_marks_or_releases_itself() {
        let s = snapshot(&["n2"], &[("me", Some(365 * 24 * 60 * MIN))]);
        let p = plan(&s, policy(1, 1), Some("me"), NOW);
        assert!(p.mark_gone.is_empty());
        assert!(p.releases.is_empty());
        // Another agent would.
        let other = plan(&s, policy(1, 1), Some("n2"), NOW);
        assert_eq!(other.releases.len(), 1);
    }

    #[test]
    fn an_unreachable_node_whose_claim_was_taken_is_not_routed() {
        // n9 announced the CIDR before n2 did: n2's record is the one that
        // was written past the claims.
        let mut s = snapshot(&["me"], &[("n2", Some(MIN))]);
        let cidr = s.members["n2"].pod_cidr;
        s.claims.insert(cidr, "n9".into());
        let mut n9 = s.members["n2"].clone();
        n9.name = "n9".into();
        n9.node_ip = std::net::Ipv4Addr::new(192, 168, 100, 99);
        s.members.insert("n9".into(), n9);
        s.order.insert("n9".into(), 1);
        let p = plan(&s, Policy::default(), Some("me"), NOW);
        assert_eq!(routed(&p), ["me", "n9"], "n9 (away too) holds it");
        assert_eq!(state(&p, "n2"), NodeState::Unreachable);
        // A claim without its own record (or without claim order) does not.
        let mut s = snapshot(&["me"], &[("n2", Some(MIN))]);
        let cidr = s.members["n2"].pod_cidr;
        s.claims.insert(cidr, "n9".into());
        assert_eq!(
            routed(&plan(&s, Policy::default(), Some("me"), NOW)),
            ["me", "n2"]
        );
        // Nor does a claim deleted by hand: n2 published its CIDR first.
        s.claims.remove(&cidr);
        assert_eq!(
            routed(&plan(&s, Policy::default(), Some("me"), NOW)),
            ["me", "n2"]
        );
        // Without claim order (an agent from before it), the claim decides.
        s.order.remove("n2");
        assert_eq!(
            routed(&plan(&s, Policy::default(), Some("me"), NOW)),
            ["me"]
        );
    }

    /// While node2 is away (restarting), a node that may write the shared
    /// claim keys rewrites node2's claim and announces node2's CIDR: node2,
    /// which announced it first, stays routed and the newcomer is refused.
    #[test]
    fn a_rewritten_claim_does_not_take_an_away_nodes_cidr() {
        let mut s = snapshot(&["me", "evil"], &[("node2", Some(MIN))]);
        let cidr = s.members["node2"].pod_cidr;
        let mut evil = s.live["evil"].clone();
        evil.pod_cidr = cidr;
        s.live.insert("evil".into(), evil.clone());
        s.members.insert("evil".into(), evil);
        s.claims.insert(cidr, "evil".into());
        // evil's claim order for this CIDR: now.
        s.order.insert("evil".into(), 900);
        let p = plan(&s, Policy::default(), Some("me"), NOW);
        assert_eq!(
            routes_of(&p, "me"),
            (vec!["node2".into()], vec!["evil".into()])
        );
    }

    #[test]
    fn claims_and_records_without_a_lease_are_tombstoned_and_released_too() {
        // A claim whose holder never published (crashed between claim and
        // publish, or an agent from before tombstones), and a tombstone
        // whose record was deleted by hand.
        let mut s = snapshot(&["me"], &[]);
        s.claims
            .insert("10.244.50.0/24".parse().expect("cidr"), "ghost".into());
        tombstone(
            &mut s,
            "deleted",
            "me",
            Tombstone {
                since: NOW - 2 * MIN,
                mod_revision: 9,
            },
        );
        let p = plan(&s, policy(1, 2), Some("me"), NOW);
        assert_eq!(p.mark_gone, ["ghost"]);
        assert_eq!(routed(&p), ["me"], "no record, nothing to route");
        assert_eq!(
            p.releases,
            [Release {
                name: "deleted".into(),
                cidrs: vec![],
                tombstones: vec![("me".into(), 9)],
            }]
        );
    }

    #[test]
    fn a_clock_behind_the_tombstone_counts_no_time_away() {
        let mut s = snapshot(&["me"], &[("n2", Some(0))]);
        if let Some(t) = s.tombstones.get_mut("n2").and_then(|t| t.get_mut("me")) {
            t.since = NOW + 30;
        }
        let p = plan(&s, policy(1, 2), Some("me"), NOW);
        assert_eq!(state(&p, "n2"), NodeState::Unreachable);
        assert!(p.releases.is_empty());
    }

    #[test]
    fn the_policy_refuses_a_release_before_the_routes_go() {
        assert!(Policy::new(Duration::from_mins(10), Duration::from_mins(1)).is_err());
        assert!(Policy::new(Duration::from_mins(1), Duration::from_mins(1)).is_ok());
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("90", 90),
            ("90s", 90),
            ("10m", 600),
            ("24h", 86_400),
            ("2d", 172_800),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
            assert_eq!(
                parse_duration(&format_duration(Duration::from_secs(secs))),
                Ok(Duration::from_secs(secs))
            );
        }
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(format_duration(Duration::from_mins(10)), "10m");
        for bad in ["", "m", "10x", "-1s", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    /// What node `me` routes to after the planner and the record checks
    /// (`routable_nodes`), as the agent does: (accepted, refused) names.
    fn routes_of(p: &Plan, me: &str) -> (Vec<String>, Vec<String>) {
        let mine = p
            .nodes
            .iter()
            .find(|n| n.record.name == me)
            .expect("me")
            .record
            .clone();
        let (ok, bad) = super::super::routable_nodes(
            &p.routed,
            (me, mine.node_ip),
            mine.pod_cidr,
            "10.244.0.0/16".parse().expect("cidr"),
        );
        let refused_by_plan = p
            .nodes
            .iter()
            .filter(|n| !n.routed)
            .map(|n| n.record.name.clone());
        (
            ok.into_iter().map(|n| n.name).collect(),
            bad.into_iter()
                .map(|(n, _)| n.name)
                .chain(refused_by_plan)
                .collect(),
        )
    }

    /// Issue 21: one `etcdctl put /podnet/nodes/0evil` with node2's pod CIDR
    /// and the attacker's node IP took node2's pods' traffic, because
    /// records were taken in name order. The incumbent holds.
    #[test]
    fn a_record_written_later_cannot_take_a_running_nodes_cidr_whatever_its_name() {
        let mut s = snapshot(&["me", "node2"], &[]);
        let node2 = s.live["node2"].clone();
        let evil = NodeRecord {
            name: "0evil".into(),
            node_ip: std::net::Ipv4Addr::new(192, 168, 100, 66),
            pod_cidr: node2.pod_cidr,
        };
        // A liveness key only, written after everyone (no durable record,
        // no claim): its order is its own creation.
        s.live.insert("0evil".into(), evil.clone());
        s.order.insert("0evil".into(), 500);
        let p = plan(&s, Policy::default(), Some("me"), NOW);
        assert_eq!(
            routes_of(&p, "me"),
            (vec!["node2".into()], vec!["0evil".into()])
        );
        assert!(p.routed.contains(&node2));

        // The same with a durable record and a claim written past the
        // claims (someone with write access to the claim keys).
        let mut s2 = s.clone();
        s2.members.insert("0evil".into(), evil.clone());
        s2.claims.insert(evil.pod_cidr, "0evil".into());
        let p = plan(&s2, Policy::default(), Some("me"), NOW);
        assert_eq!(
            routes_of(&p, "me"),
            (vec!["node2".into()], vec!["0evil".into()])
        );

        // And while node2 is restarting (unreachable, its claim intact):
        // a live newcomer does not get its CIDR either.
        let mut s3 = s.clone();
        s3.live.remove("node2");
        let p = plan(&s3, Policy::default(), Some("me"), NOW);
        assert_eq!(state(&p, "node2"), NodeState::Unreachable);
        assert_eq!(
            routes_of(&p, "me"),
            (vec!["node2".into()], vec!["0evil".into()])
        );
    }

    #[test]
    fn claim_order_not_name_order_decides_and_a_released_cidr_can_be_taken() {
        // `a` joined after `z` with an overlapping CIDR: z holds.
        let mut s = snapshot(&["me", "z"], &[]);
        let mut a = s.live["z"].clone();
        a.name = "a".into();
        a.node_ip = std::net::Ipv4Addr::new(192, 168, 100, 99);
        s.live.insert("a".into(), a.clone());
        s.members.insert("a".into(), a.clone());
        s.order.insert("a".into(), 99);
        assert_eq!(
            routes_of(&plan(&s, Policy::default(), Some("me"), NOW), "me").0,
            ["z"]
        );
        // Once z is gone (past the grace period), its record no longer
        // holds the CIDR: `a` is routed.
        let mut gone = s.clone();
        gone.live.remove("z");
        tombstone(
            &mut gone,
            "z",
            "me",
            Tombstone {
                since: NOW - 20 * MIN,
                mod_revision: 60,
            },
        );
        assert_eq!(
            routes_of(&plan(&gone, policy(10, 60), Some("me"), NOW), "me").0,
            ["a"]
        );
    }

    #[test]
    fn claim_problems_finds_double_claims() {
        let good = snapshot(&["a", "b"], &[("c", Some(0))]);
        assert!(
            claim_problems(&good).is_empty(),
            "{:?}",
            claim_problems(&good)
        );

        let mut two = good.clone();
        two.claims
            .insert("10.244.77.0/24".parse().expect("cidr"), "a".into());
        assert_eq!(claim_problems(&two).len(), 1, "{:?}", claim_problems(&two));

        let mut overlap = good.clone();
        overlap
            .claims
            .insert("10.244.1.0/25".parse().expect("cidr"), "z".into());
        assert!(!claim_problems(&overlap).is_empty());

        let mut unclaimed = good.clone();
        let b_cidr = unclaimed.live["b"].pod_cidr;
        unclaimed.claims.insert(b_cidr, "c".into());
        assert!(!claim_problems(&unclaimed).is_empty());
    }

    /// Issue 21: tombstones were one shared key every node's role could
    /// write, so a compromised node could tombstone a restarting node with
    /// an early time and take it off every node's routes at once. Now each
    /// witness writes its own and the latest counts.
    #[test]
    fn an_early_tombstone_from_one_node_does_not_make_a_restarting_node_gone() {
        let mut s = snapshot(&["me", "n2", "n3", "evil"], &[("node9", None)]);
        s.published.insert("node9".into(), 40);
        let p = policy(10, 60);
        // The oldest nodes that were there when node9 last published
        // witness it; evil claimed its place after that.
        s.order.insert("evil".into(), 45);
        assert_eq!(s.witnesses("node9"), ["me", "n2", "n3"]);
        let early = Tombstone {
            since: 0,
            mod_revision: 60,
        };
        tombstone(&mut s, "node9", "evil", early);
        assert_eq!(
            state(&plan(&s, p, Some("me"), NOW), "node9"),
            NodeState::Unreachable
        );
        assert_eq!(plan(&s, p, Some("me"), NOW).mark_gone, ["node9"]);
        // A witness gone bad writes the early time too: the other
        // witness's later one counts.
        tombstone(&mut s, "node9", "n2", early);
        tombstone(
            &mut s,
            "node9",
            "me",
            Tombstone {
                since: NOW - MIN,
                mod_revision: 61,
            },
        );
        let seen = plan(&s, p, Some("me"), NOW);
        assert_eq!(state(&seen, "node9"), NodeState::Unreachable);
        assert!(seen.mark_gone.is_empty(), "me has written its own");
        assert!(seen.routed.iter().any(|r| r.name == "node9"));
        // evil, no witness, is never asked to write one.
        assert!(plan(&s, p, Some("evil"), NOW).mark_gone.is_empty());
        // Honest witnesses agreeing on an old time: gone, and released
        // with every tombstone removed.
        let old = Tombstone {
            since: NOW - 2 * 60 * MIN,
            mod_revision: 62,
        };
        tombstone(&mut s, "node9", "me", old);
        tombstone(&mut s, "node9", "n2", old);
        let later = plan(&s, p, Some("me"), NOW);
        assert_eq!(state(&later, "node9"), NodeState::Gone);
        assert_eq!(later.releases.len(), 1);
        assert_eq!(
            later.releases[0].tombstones,
            [
                ("evil".to_owned(), 60),
                ("me".to_owned(), 62),
                ("n2".to_owned(), 62)
            ]
        );
    }

    #[test]
    fn a_tombstone_from_an_earlier_absence_does_not_count() {
        let mut s = snapshot(&["me"], &[("n2", Some(3 * 60 * MIN))]);
        // n2 came back and published at 70, after the tombstone (50), and
        // left again: the old tombstone says nothing about this absence.
        s.published.insert("n2".into(), 70);
        let p = plan(&s, policy(10, 60), Some("me"), NOW);
        assert_eq!(state(&p, "n2"), NodeState::Unreachable);
        assert_eq!(p.mark_gone, ["n2"], "me writes a fresh one");
        assert!(p.releases.is_empty());
    }

    #[test]
    fn a_node_has_at_most_three_witnesses_the_oldest_first() {
        let mut s = snapshot(&["a", "b", "c", "d", "e"], &[("x", None)]);
        assert_eq!(s.witnesses("x"), ["a", "b", "c"]);
        assert_eq!(plan(&s, Policy::default(), Some("c"), NOW).mark_gone, ["x"]);
        assert!(
            plan(&s, Policy::default(), Some("d"), NOW)
                .mark_gone
                .is_empty()
        );
        // Those that were there when x last published come first; while
        // they are fewer than three, the oldest of the later ones stand in.
        s.published.insert("x".into(), 12);
        assert_eq!(s.witnesses("x"), ["a", "b", "c"]);
        s.order.insert("a".into(), 30);
        assert_eq!(
            s.witnesses("x"),
            ["b", "c", "d"],
            "b was there; c, d stand in"
        );
    }

    fn cidr(third: u8) -> Ipv4Net {
        Ipv4Net::new(std::net::Ipv4Addr::new(10, 244, third, 0), 24).expect("cidr")
    }

    /// Issue 21: the shared `cidrs/` keys let any node rewrite any claim.
    /// Claims are now the nodes' own keys, and the oldest holds.
    #[test]
    fn the_oldest_claim_holds_and_a_node_cannot_hoard_cidrs_under_its_own_keys() {
        let mut held = BTreeMap::new();
        held.insert(("node2".to_owned(), cidr(2)), 10);
        // evil claims node2's CIDR later, and ten free ones.
        held.insert(("evil".to_owned(), cidr(2)), 20);
        for third in 30..40 {
            held.insert(("evil".to_owned(), cidr(third)), 20 + i64::from(third));
        }
        let mut legacy = BTreeMap::new();
        // An old agent's claim on a CIDR, rewritten later to name evil:
        // the key's creation revision is evil's write.
        legacy.insert(cidr(2), ("evil".to_owned(), 25));
        legacy.insert(cidr(7), ("old".to_owned(), 5));
        let live = BTreeMap::new();
        let mut members = BTreeMap::new();
        members.insert("evil".to_owned(), record("evil", 31));
        let claims = decide_claims(&held, &legacy, &live, &members);
        assert_eq!(claims[&cidr(2)], "node2");
        assert_eq!(claims[&cidr(7)], "old");
        // evil holds what its record announces and its newest claim: two.
        let evils: Vec<Ipv4Net> = claims
            .iter()
            .filter(|(_, n)| *n == "evil")
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(evils, [cidr(31), cidr(39)]);
        // Two claims made at once: the one etcd ordered first holds.
        held.insert(("node4".to_owned(), cidr(4)), 101);
        held.insert(("node5".to_owned(), cidr(4)), 100);
        assert_eq!(
            decide_claims(&held, &legacy, &live, &members)[&cidr(4)],
            "node5"
        );
    }
}
