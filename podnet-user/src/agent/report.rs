//! The datapath's state as the socket API reports it (plain data): the
//! agent answers with these, and podnetctl uses them on the pinned maps
//! when the agent is down.

use std::path::Path;

use crate::{
    api::{CounterTotals, FlowShare, StackFlowStatus},
    datapath::{Counters, Datapath, DatapathError, FlowSweeper, monotonic_coarse_ns},
};

/// Verdict and drop totals by name.
#[must_use]
pub fn counter_totals(c: Counters) -> CounterTotals {
    let owned = |m: std::collections::BTreeMap<&'static str, u64>| {
        m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    };
    CounterTotals {
        verdicts: owned(c.verdicts),
        drops: owned(c.drops),
    }
}

/// Every entry of the datapath's stack-flows map, most recent first.
pub fn stack_flows(datapath: &mut Datapath) -> Result<Vec<StackFlowStatus>, DatapathError> {
    let now = monotonic_coarse_ns();
    let mut flows: Vec<StackFlowStatus> = datapath
        .stack_flows()?
        .iter()
        .map(|(key, flow)| StackFlowStatus::new(key, flow, now))
        .collect();
    flows.sort_by_key(|f| f.idle_s);
    Ok(flows)
}

/// Each endpoint's share of the stack-flows table, read from the pins in
/// `pin_dir`, with the limit `limit` (the node config's); largest first.
pub fn flow_shares(pin_dir: &Path, limit: u32) -> Result<Vec<FlowShare>, DatapathError> {
    let mut shares: Vec<FlowShare> = FlowSweeper::open(pin_dir)?
        .shares()?
        .into_iter()
        .map(|(ip, owner)| FlowShare {
            ip,
            flows: owner.flows,
            refused: owner.refused,
            limit,
        })
        .collect();
    shares.sort_by_key(|s| std::cmp::Reverse((s.flows, s.refused)));
    Ok(shares)
}
