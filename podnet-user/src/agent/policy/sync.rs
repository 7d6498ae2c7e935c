//! Writing a compiled plan into the policy maps, make-before-break (see
//! the module doc of [`super`]), behind a small interface so the order and
//! the handling of a full map are tested without a kernel.

use std::{collections::BTreeMap, net::Ipv4Addr};

use podnet_common::{PolicyCidrKey, PolicyKey, PolicyRule, endpoint::ENDPOINT_F_POLICY};

use crate::{
    datapath::{Datapath, DatapathError},
    policy::PolicyPlan,
};

/// The policy maps as the sync writes them.
pub trait PolicyMaps {
    fn identities(&mut self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError>;
    fn rules(&mut self) -> Result<BTreeMap<(u32, PolicyKey), PolicyRule>, DatapathError>;
    fn cidrs(&mut self) -> Result<BTreeMap<(u32, PolicyCidrKey), u32>, DatapathError>;
    /// Every local endpoint's `ENDPOINT_F_POLICY_*` bits.
    fn endpoint_flags(&mut self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError>;
    fn upsert_identity(&mut self, ip: Ipv4Addr, identity: u32) -> Result<(), DatapathError>;
    fn remove_identity(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError>;
    fn upsert_rule(
        &mut self,
        prefix: u32,
        key: PolicyKey,
        rule: PolicyRule,
    ) -> Result<(), DatapathError>;
    fn remove_rule(&mut self, prefix: u32, key: PolicyKey) -> Result<(), DatapathError>;
    fn upsert_cidr(
        &mut self,
        prefix: u32,
        key: PolicyCidrKey,
        set: u32,
    ) -> Result<(), DatapathError>;
    fn remove_cidr(&mut self, prefix: u32, key: PolicyCidrKey) -> Result<(), DatapathError>;
    /// Returns false when `ip` is no local endpoint (any more).
    fn set_flags(&mut self, ip: Ipv4Addr, flags: u32) -> Result<bool, DatapathError>;
}

impl PolicyMaps for Datapath {
    fn identities(&mut self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError> {
        Datapath::identities(self)
    }
    fn rules(&mut self) -> Result<BTreeMap<(u32, PolicyKey), PolicyRule>, DatapathError> {
        self.policy_rules()
    }
    fn cidrs(&mut self) -> Result<BTreeMap<(u32, PolicyCidrKey), u32>, DatapathError> {
        self.policy_cidrs()
    }
    fn endpoint_flags(&mut self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError> {
        Ok(self
            .endpoints()?
            .into_iter()
            .map(|(ip, info)| (ip, info.flags & ENDPOINT_F_POLICY))
            .collect())
    }
    fn upsert_identity(&mut self, ip: Ipv4Addr, identity: u32) -> Result<(), DatapathError> {
        Datapath::upsert_identity(self, ip, identity)
    }
    fn remove_identity(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        Datapath::remove_identity(self, ip)
    }
    fn upsert_rule(
        &mut self,
        prefix: u32,
        key: PolicyKey,
        rule: PolicyRule,
    ) -> Result<(), DatapathError> {
        self.upsert_policy_rule(prefix, key, rule)
    }
    fn remove_rule(&mut self, prefix: u32, key: PolicyKey) -> Result<(), DatapathError> {
        self.remove_policy_rule(prefix, key)
    }
    fn upsert_cidr(
        &mut self,
        prefix: u32,
        key: PolicyCidrKey,
        set: u32,
    ) -> Result<(), DatapathError> {
        self.upsert_policy_cidr(prefix, key, set)
    }
    fn remove_cidr(&mut self, prefix: u32, key: PolicyCidrKey) -> Result<(), DatapathError> {
        self.remove_policy_cidr(prefix, key)
    }
    fn set_flags(&mut self, ip: Ipv4Addr, flags: u32) -> Result<bool, DatapathError> {
        self.set_policy_flags(ip, flags)
    }
}

/// What the maps hold (as last read or written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub identities: BTreeMap<Ipv4Addr, u32>,
    pub rules: BTreeMap<(u32, PolicyKey), PolicyRule>,
    pub cidrs: BTreeMap<(u32, PolicyCidrKey), u32>,
    /// Local endpoints' policy bits (0 included).
    pub endpoints: BTreeMap<Ipv4Addr, u32>,
}

impl Applied {
    /// What the pinned maps hold now (an agent's first sync after a
    /// restart starts from there).
    pub fn read(maps: &mut impl PolicyMaps) -> Result<Self, DatapathError> {
        Ok(Self {
            identities: maps.identities()?,
            rules: maps.rules()?,
            cidrs: maps.cidrs()?,
            endpoints: maps.endpoint_flags()?,
        })
    }
}

/// How a sync went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries written and removed.
    pub written: usize,
    pub removed: usize,
    /// Entries a map refused to take.
    pub refused: u64,
    /// What failed, in order.
    pub errors: Vec<String>,
}

/// Brings the maps from `current` to `plan`: new and changed rules, CIDR
/// sets and identities first, then the endpoints' bits (on and off), then
/// the removals. Returns what the maps hold afterwards (an entry that
/// failed to be written is not in it, so the next sync tries again) and
/// the report. An endpoint whose entries were refused is still selected:
/// it denies what they would allow, and the error says so.
pub fn apply_plan(
    maps: &mut impl PolicyMaps,
    mut current: Applied,
    plan: &PolicyPlan,
) -> (Applied, SyncReport) {
    let mut report = SyncReport::default();
    upsert(
        &plan.rules,
        &mut current.rules,
        &mut report,
        |(prefix, key), rule| maps.upsert_rule(prefix, key, rule),
    );
    upsert(
        &plan.cidrs,
        &mut current.cidrs,
        &mut report,
        |(prefix, key), set| maps.upsert_cidr(prefix, key, set),
    );
    upsert(
        &plan.identities,
        &mut current.identities,
        &mut report,
        |ip, identity| maps.upsert_identity(ip, identity),
    );
    set_endpoint_flags(maps, &mut current, plan, &mut report);
    remove_stale(
        &plan.identities,
        &mut current.identities,
        &mut report,
        |ip| maps.remove_identity(ip),
    );
    remove_stale(
        &plan.cidrs,
        &mut current.cidrs,
        &mut report,
        |(prefix, key)| maps.remove_cidr(prefix, key),
    );
    remove_stale(
        &plan.rules,
        &mut current.rules,
        &mut report,
        |(prefix, key)| maps.remove_rule(prefix, key),
    );
    (current, report)
}

/// Writes the entries of `wanted` that `held` lacks or holds otherwise;
/// `held` follows what was written.
fn upsert<K: Ord + Copy, V: PartialEq + Copy>(
    wanted: &BTreeMap<K, V>,
    held: &mut BTreeMap<K, V>,
    report: &mut SyncReport,
    mut write: impl FnMut(K, V) -> Result<(), DatapathError>,
) {
    for (&key, &value) in wanted {
        if held.get(&key) == Some(&value) {
            continue;
        }
        match write(key, value) {
            Ok(()) => {
                held.insert(key, value);
                report.written += 1;
            }
            Err(e) => refused(report, &e),
        }
    }
}

/// Removes the entries of `held` that `wanted` lacks.
fn remove_stale<K: Ord + Copy, V>(
    wanted: &BTreeMap<K, V>,
    held: &mut BTreeMap<K, V>,
    report: &mut SyncReport,
    mut remove: impl FnMut(K) -> Result<(), DatapathError>,
) {
    let stale: Vec<K> = held
        .keys()
        .filter(|k| !wanted.contains_key(k))
        .copied()
        .collect();
    for key in stale {
        match remove(key) {
            Ok(()) => {
                held.remove(&key);
                report.removed += 1;
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
}

/// The endpoints' policy bits, on and off, as the plan says.
fn set_endpoint_flags(
    maps: &mut impl PolicyMaps,
    current: &mut Applied,
    plan: &PolicyPlan,
    report: &mut SyncReport,
) {
    // As the maps hold them now: an endpoint added again since the last
    // sync (a new pod on a reused address) starts from none.
    match maps.endpoint_flags() {
        Ok(actual) => current.endpoints = actual,
        Err(e) => report
            .errors
            .push(format!("reading the endpoints' policy bits: {e}")),
    }
    // Every endpoint the plan knows, and those the maps had bits for that
    // the plan no longer selects.
    let mut flags: BTreeMap<Ipv4Addr, u32> = current.endpoints.keys().map(|&ip| (ip, 0)).collect();
    flags.extend(
        plan.endpoints
            .iter()
            .map(|(&ip, &f)| (ip, f & ENDPOINT_F_POLICY)),
    );
    for (ip, wanted) in flags {
        if current.endpoints.get(&ip) == Some(&wanted) {
            continue;
        }
        match maps.set_flags(ip, wanted) {
            Ok(true) => {
                current.endpoints.insert(ip, wanted);
                report.written += 1;
            }
            // Gone meanwhile (a CNI DEL): nothing to select.
            Ok(false) => {
                current.endpoints.remove(&ip);
            }
            Err(e) => report
                .errors
                .push(format!("setting the policy bits of {ip}: {e}")),
        }
    }
}

fn refused(report: &mut SyncReport, error: &DatapathError) {
    report.refused += 1;
    // One message per sync is enough to name the map; the count says how
    // many.
    if report.errors.len() < 8 {
        report.errors.push(error.with_sources());
    }
}
