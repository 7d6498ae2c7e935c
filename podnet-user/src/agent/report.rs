//! The datapath's state as the socket API reports it (plain data): the
//! agent answers with these, and podnetctl uses them on the pinned maps
//! when the agent is down.

use crate::{
    api::{CounterTotals, StackFlowStatus},
    datapath::{Counters, Datapath, DatapathError, monotonic_coarse_ns},
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
