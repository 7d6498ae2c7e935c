//! The datapath's state as the socket API reports it (plain data): the
//! agent answers with these, and podnetctl uses them on the pinned maps
//! when the agent is down.

use std::path::Path;

use crate::{
    api::{
        AgentStatus, CounterTotals, FlowShare, StackFlowStatus,
        tables::{TABLES, TableFill},
    },
    datapath::{Counters, Datapath, DatapathError, FlowSweeper, monotonic_coarse_ns, pinned_fill},
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

/// How full the bounded flow tables ([`TABLES`]) pinned in `pin_dir` are.
/// Counting walks every key (the metrics' count, one syscall per entry):
/// call it without the agent's lock.
pub fn table_fill(pin_dir: &Path) -> Result<Vec<TableFill>, DatapathError> {
    let maps = TABLES.map(|(map, _)| map);
    Ok(pinned_fill(pin_dir, &maps)?
        .into_iter()
        .zip(TABLES)
        .map(|(fill, (map, table))| TableFill::new(table, map, fill.entries, fill.max_entries))
        .collect())
}

/// `status` with the tables' fill from the pins in `pin_dir` (or why they
/// could not be counted).
#[must_use]
pub fn with_table_fill(mut status: AgentStatus, pin_dir: &Path) -> AgentStatus {
    match table_fill(pin_dir) {
        Ok(tables) => status.tables = tables,
        Err(e) => status.tables_error = Some(format!("{:#}", anyhow::Error::from(e))),
    }
    status
}
