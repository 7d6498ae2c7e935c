//! The datapath's counters as the agent reports them, looked up by the
//! shared enums ([`Verdict`], [`DropReason`]) rather than by a string: a
//! renamed or missing counter fails the test instead of reading as 0 (which
//! would make "nothing moved" pass for the wrong reason).

use std::path::Path;

use podnet::api::{Client, CounterTotals, Request};
use podnet_common::{DropReason, Verdict};

/// A verdict or a drop reason: one of the agent's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Verdict(Verdict),
    Drop(DropReason),
}

impl From<Verdict> for Counter {
    fn from(v: Verdict) -> Self {
        Self::Verdict(v)
    }
}

impl From<DropReason> for Counter {
    fn from(r: DropReason) -> Self {
        Self::Drop(r)
    }
}

impl Counter {
    /// The name the agent reports it under (`podnetctl counters`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Verdict(v) => v.name(),
            Self::Drop(r) => r.name(),
        }
    }
}

/// The counter totals of the agent behind `socket`; panics when it does not
/// answer.
#[must_use]
pub fn totals(socket: &Path) -> CounterTotals {
    Client::new(socket)
        .call(&Request::Counters)
        .unwrap_or_else(|e| panic!("counters of the agent at {}: {e}", socket.display()))
}

/// `counter` in `totals`; panics when the agent did not report it.
#[must_use]
pub fn get(totals: &CounterTotals, counter: impl Into<Counter>) -> u64 {
    let counter = counter.into();
    let (map, kind) = match counter {
        Counter::Verdict(_) => (&totals.verdicts, "verdicts"),
        Counter::Drop(_) => (&totals.drops, "drops"),
    };
    map.get(counter.name()).copied().unwrap_or_else(|| {
        panic!(
            "the agent reports no {kind} counter {:?} ({counter:?}); it reports {:?}",
            counter.name(),
            map.keys().collect::<Vec<_>>()
        )
    })
}

/// `counter` of the agent behind `socket`, read now; panics when the agent
/// does not answer or does not report it.
#[must_use]
pub fn read(socket: &Path, counter: impl Into<Counter>) -> u64 {
    get(&totals(socket), counter)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use podnet::api::CounterTotals;
    use podnet_common::{DropReason, Verdict};

    fn totals() -> CounterTotals {
        CounterTotals {
            verdicts: BTreeMap::from([("redirect_peer".to_owned(), 7)]),
            drops: BTreeMap::from([("spoofed_source_ip".to_owned(), 3)]),
        }
    }

    #[test]
    fn counters_are_found_by_the_enums_names() {
        assert_eq!(super::get(&totals(), Verdict::RedirectPeer), 7);
        assert_eq!(super::get(&totals(), DropReason::SpoofedSourceIp), 3);
    }

    #[test]
    #[should_panic(expected = "no verdicts counter \"to_shaper\"")]
    fn a_counter_the_agent_does_not_report_fails() {
        let _ = super::get(&totals(), Verdict::ToShaper);
    }
}
