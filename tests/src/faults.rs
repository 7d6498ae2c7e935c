//! Checks for datastore-fault tests: something sampled all along a fault
//! (routes present, CIDR claims unique), and the time the agents take to
//! follow the datastore again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use podnet::datastore::membership::NodeState;

use crate::lab::{self, LabLayout};

/// What a [`Sampler`] found.
#[derive(Debug, Default)]
pub struct SampleReport {
    pub samples: u64,
    /// (since the start, what was wrong), the first 20.
    pub failures: Vec<(Duration, String)>,
    pub failed: u64,
}

impl SampleReport {
    /// Panics with `what` and the failures unless every sample passed.
    pub fn assert_clean(&self, what: &str) {
        assert!(self.samples > 0, "{what}: nothing was sampled");
        assert!(
            self.failed == 0,
            "{what}: {} of {} samples failed, first: {:?}",
            self.failed,
            self.samples,
            self.failures
        );
    }
}

/// Calls a check every `interval` on a thread until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<SampleReport>,
}

impl Sampler {
    pub fn start(
        interval: Duration,
        mut check: impl FnMut() -> Result<(), String> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut report = SampleReport::default();
            while !flag.load(Ordering::Relaxed) {
                report.samples += 1;
                if let Err(e) = check() {
                    report.failed += 1;
                    if report.failures.len() < 20 {
                        report.failures.push((start.elapsed(), e));
                    }
                }
                std::thread::sleep(interval);
            }
            report
        });
        Self { stop, thread }
    }

    pub fn finish(self) -> SampleReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| SampleReport {
            samples: 1,
            failed: 1,
            failures: vec![(Duration::ZERO, "the sampler panicked".into())],
        })
    }
}

/// Whether `netns` has a route for `cidr` (`ip route show <cidr>`).
#[must_use]
pub fn has_route(netns: &str, cidr: &str) -> bool {
    lab::in_netns(netns, "ip")
        .and_then(|mut c| Ok(c.args(["route", "show", cidr]).output()?))
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(cidr))
}

/// A check that every node has a route to every other node's pod CIDR.
pub fn all_routes_present(
    layout: &LabLayout,
) -> impl FnMut() -> Result<(), String> + Send + 'static {
    let nodes: Vec<(String, String, String)> = layout
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.netns.clone(), n.pod_cidr.clone()))
        .collect();
    move || {
        for (name, netns, _) in &nodes {
            for (other, _, cidr) in &nodes {
                if other != name && !has_route(netns, cidr) {
                    return Err(format!("{name} has no route to {other}'s {cidr}"));
                }
            }
        }
        Ok(())
    }
}

/// A check that etcd's CIDR claims are each held once (see
/// [`podnet::datastore::membership::claim_problems`]); an etcd that does
/// not answer passes (there is nothing to claim then).
pub fn claims_unique(layout: &LabLayout) -> impl FnMut() -> Result<(), String> + Send + 'static {
    let layout = layout.clone();
    move || match layout.etcd_snapshot() {
        Ok(snapshot) => {
            let problems = podnet::datastore::membership::claim_problems(&snapshot);
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems.join("; "))
            }
        }
        Err(_) => Ok(()),
    }
}

#[must_use]
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What [`converged`] asks of every agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Converged<'a> {
    /// Synced at or after this time (Unix ms).
    pub since_ms: u64,
    /// Connected to another member than this one (a member that was
    /// killed).
    pub not_on: Option<&'a str>,
}

/// Whether every agent follows the datastore (as `want` says) and sees
/// every other lab node live and routed; `Err` says who does not yet.
pub fn converged(layout: &LabLayout, want: Converged<'_>) -> Result<(), String> {
    for node in &layout.nodes {
        let status = layout
            .datastore_status(&node.name)
            .map_err(|e| format!("{}: {e:#}", node.name))?;
        if !status.connected {
            return Err(format!(
                "{} is not connected: {}",
                node.name,
                status.last_error.unwrap_or_default()
            ));
        }
        if want.not_on.is_some() && status.endpoint.as_deref() == want.not_on {
            return Err(format!("{} is still on {:?}", node.name, want.not_on));
        }
        let since_ms = want.since_ms;
        if status.last_sync_ms.is_none_or(|t| t < since_ms) {
            return Err(format!("{} has not synced since", node.name));
        }
        for other in layout.nodes.iter().filter(|o| o.name != node.name) {
            let seen = status
                .nodes
                .iter()
                .find(|n| n.record.name == other.name)
                .map(|n| (n.state, n.routed));
            if seen != Some((NodeState::Live, true)) {
                return Err(format!("{} sees {} as {seen:?}", node.name, other.name));
            }
        }
    }
    Ok(())
}

/// Waits until [`converged`] holds, up to `limit` after `from`; returns
/// how long it took from `from`, or what still did not hold.
pub fn wait_converged(
    layout: &LabLayout,
    from: Instant,
    want: Converged<'_>,
    limit: Duration,
) -> Result<Duration, String> {
    loop {
        match converged(layout, want) {
            Ok(()) => return Ok(from.elapsed()),
            Err(e) if from.elapsed() > limit => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
