//! Fail points: the places in ADD and DEL (the plugin's and the agent's
//! halves) where a test build can make its own process die by SIGKILL, the
//! way an OOM kill, a runtime's timeout or a node losing power ends it: no
//! destructor, no rollback, no answer. The tests arm one, let the process
//! die there, then do what a runtime does next (ADD again, DEL, GC, restart
//! the agent) and count what is left over.
//!
//! **Only in test builds.** The code that reads [`ENV`] and kills the
//! process exists only when the crate is built with the `failpoints`
//! feature *and* with debug assertions. The feature is off by default and
//! is turned on by the test crate's dependency on this one (cargo unifies
//! features over the packages of one build, so `cargo build --bins` /
//! `cargo xtask test` at the workspace root build the binaries the tests
//! run with it); debug assertions are off in every release build (`cargo
//! build --release`, what the README installs), so a release binary never
//! has fail points, whichever packages were built beside it. Everywhere
//! else [`hit`] is an empty inline function and the variable is never
//! read.
//!
//! A fail point is armed with `PODNET_FAILPOINT=<name>` in the process's
//! environment ([`FailPoint::name`]): the plugin reads it per invocation,
//! the agent once at start ([`announce`]).

/// The environment variable that arms a fail point.
pub const ENV: &str = "PODNET_FAILPOINT";

/// A place in ADD or DEL where a test build may die.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailPoint {
    /// Plugin ADD: the address is reserved (IPAM record written), nothing
    /// else exists.
    AddAfterIpam,
    /// Plugin ADD: the veth pair exists (both ends down, pod end in the
    /// pod's netns); the agent knows nothing.
    AddAfterVeth,
    /// Plugin ADD: the agent has attached the filters and written the
    /// endpoint (map entries and record); the links are still down.
    AddAfterAgent,
    /// Plugin ADD: the host end is up with its route to the pod; the pod
    /// end is still down, without an address.
    AddAfterHostUp,
    /// Plugin ADD: the pod end is configured and up (everything is done),
    /// the result is not printed yet: the runtime sees a crash.
    AddAfterPodUp,
    /// Plugin DEL: the address is released; veth and endpoint remain.
    DelAfterRelease,
    /// Plugin DEL: the veth is deleted; the agent still has the endpoint.
    DelAfterVeth,
    /// Plugin DEL: the agent removed the endpoint (everything is done);
    /// the runtime sees a crash.
    DelAfterAgent,
    /// Agent, adding an endpoint: its record is written, no filter, no map
    /// entry.
    AgentAddAfterRecord,
    /// Agent, adding an endpoint: the map entries are written and the
    /// filters are on the host veth; the plugin has no answer yet.
    AgentAddAfterAttach,
    /// Agent, adding an endpoint: the map entries are written, the filters
    /// are not attached yet (entries come first, see `install`).
    AgentAddAfterEntry,
    /// Agent, removing an endpoint: its map entries are gone, its record
    /// is not.
    AgentDelAfterEntry,
    /// Agent, removing an endpoint: entries and record are gone, the
    /// plugin has no answer yet.
    AgentDelAfterRecord,
}

impl FailPoint {
    /// Every fail point, in the order a pod meets them.
    pub const ALL: [Self; 13] = [
        Self::AddAfterIpam,
        Self::AddAfterVeth,
        Self::AddAfterAgent,
        Self::AddAfterHostUp,
        Self::AddAfterPodUp,
        Self::DelAfterRelease,
        Self::DelAfterVeth,
        Self::DelAfterAgent,
        Self::AgentAddAfterRecord,
        Self::AgentAddAfterAttach,
        Self::AgentAddAfterEntry,
        Self::AgentDelAfterEntry,
        Self::AgentDelAfterRecord,
    ];

    /// The value of [`ENV`] that arms it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::AddAfterIpam => "add:after-ipam",
            Self::AddAfterVeth => "add:after-veth",
            Self::AddAfterAgent => "add:after-agent",
            Self::AddAfterHostUp => "add:after-host-up",
            Self::AddAfterPodUp => "add:after-pod-up",
            Self::DelAfterRelease => "del:after-release",
            Self::DelAfterVeth => "del:after-veth",
            Self::DelAfterAgent => "del:after-agent",
            Self::AgentAddAfterRecord => "agent-add:after-record",
            Self::AgentAddAfterAttach => "agent-add:after-attach",
            Self::AgentAddAfterEntry => "agent-add:after-entry",
            Self::AgentDelAfterEntry => "agent-del:after-entry",
            Self::AgentDelAfterRecord => "agent-del:after-record",
        }
    }

    /// The fail point named `name`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether it is the agent (`podnetd`) that dies there; else the plugin.
    #[must_use]
    pub const fn in_agent(self) -> bool {
        matches!(
            self,
            Self::AgentAddAfterRecord
                | Self::AgentAddAfterAttach
                | Self::AgentAddAfterEntry
                | Self::AgentDelAfterEntry
                | Self::AgentDelAfterRecord
        )
    }

    /// Whether it lies on the ADD path (plugin or agent); else DEL.
    #[must_use]
    pub const fn in_add(self) -> bool {
        matches!(
            self,
            Self::AddAfterIpam
                | Self::AddAfterVeth
                | Self::AddAfterAgent
                | Self::AddAfterHostUp
                | Self::AddAfterPodUp
                | Self::AgentAddAfterRecord
                | Self::AgentAddAfterAttach
                | Self::AgentAddAfterEntry
        )
    }
}

impl std::fmt::Display for FailPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The environment variable that arms a [`Fault`].
pub const FAULT_ENV: &str = "PODNET_FAULT";

/// A step of the agent that a test build can make fail, with an error,
/// every time it runs: what a node sees when the kernel keeps refusing
/// something a test cannot make it refuse (the node network's devices).
/// The agent carries on as it does for a real failure (retries, status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Setting up the node's network (devices, programs on them, node
    /// config) fails before anything is changed.
    NodeNetwork,
    /// Adding an endpoint fails once its map entries are written, before
    /// its filters are attached.
    EndpointInstall,
}

impl Fault {
    /// The value of [`FAULT_ENV`] that arms it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NodeNetwork => "node-network",
            Self::EndpointInstall => "endpoint-install",
        }
    }
}

/// Whether `fault` is armed ([`FAULT_ENV`] names it, read once per
/// process); always false in a build without fail points.
#[must_use]
pub fn faulty(fault: Fault) -> bool {
    #[cfg(all(feature = "failpoints", debug_assertions))]
    {
        static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        ARMED
            .get_or_init(|| std::env::var(FAULT_ENV).ok())
            .as_deref()
            == Some(fault.name())
    }
    #[cfg(not(all(feature = "failpoints", debug_assertions)))]
    {
        let _ = fault;
        false
    }
}

/// Whether this build has fail points (a test build); see the module docs.
#[must_use]
pub const fn compiled_in() -> bool {
    cfg!(all(feature = "failpoints", debug_assertions))
}

/// Dies here by SIGKILL when `point` is the armed fail point; nothing in
/// any other case, and nothing at all in a build without fail points.
#[inline]
pub fn hit(point: FailPoint) {
    #[cfg(all(feature = "failpoints", debug_assertions))]
    armed::hit(point);
    #[cfg(not(all(feature = "failpoints", debug_assertions)))]
    let _ = point;
}

/// Reads [`ENV`] now (the agent calls it at start, so what it runs with is
/// fixed and logged before it serves) and says on stderr when a fail point
/// is armed, or named but unknown. Nothing in a build without fail points.
pub fn announce(process: &str) {
    #[cfg(all(feature = "failpoints", debug_assertions))]
    armed::announce(process);
    #[cfg(not(all(feature = "failpoints", debug_assertions)))]
    let _ = process;
}

#[cfg(all(feature = "failpoints", debug_assertions))]
mod armed {
    use std::sync::OnceLock;

    use super::{ENV, FailPoint};

    /// What [`ENV`] said, read once per process.
    fn armed() -> Option<FailPoint> {
        static ARMED: OnceLock<Option<FailPoint>> = OnceLock::new();
        *ARMED.get_or_init(|| {
            let name = std::env::var(ENV).ok()?;
            let point = FailPoint::from_name(&name);
            if point.is_none() {
                // Loud: a test that misspells a fail point must not pass
                // because nothing died.
                eprintln!("{ENV}={name} names no fail point; nothing is armed");
            }
            point
        })
    }

    pub(super) fn announce(process: &str) {
        if let Some(point) = armed() {
            eprintln!("{process}: TEST BUILD: fail point {point} armed ({ENV}); it will die there");
        }
        if let Ok(fault) = std::env::var(super::FAULT_ENV) {
            eprintln!(
                "{process}: TEST BUILD: fault {fault} armed ({}); that step fails every time",
                super::FAULT_ENV
            );
        }
    }

    pub(super) fn hit(point: FailPoint) {
        if armed() != Some(point) {
            return;
        }
        eprintln!("fail point {point}: SIGKILL");
        // SIGKILL, not abort(): the runtime must see what an OOM kill looks
        // like (no core, no unwinding, no handler). It cannot be caught or
        // blocked, so the kernel ends every thread before kill(2) returns.
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        // Not reached; should it be, dying differently is still dying.
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fail_point_has_a_distinct_name_that_finds_it_again() {
        let names: std::collections::HashSet<_> = FailPoint::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), FailPoint::ALL.len());
        for point in FailPoint::ALL {
            assert_eq!(FailPoint::from_name(point.name()), Some(point));
            // Agent and plugin fail points are told apart by their name.
            assert_eq!(point.in_agent(), point.name().starts_with("agent-"));
            assert_eq!(point.in_add(), point.name().contains("add:"));
        }
        assert_eq!(FailPoint::from_name("add:after-nothing"), None);
    }

    #[test]
    fn an_unarmed_fail_point_returns() {
        // The unit tests never set the variable: hitting is a no-op.
        assert!(std::env::var_os(ENV).is_none());
        for point in FailPoint::ALL {
            hit(point);
        }
    }
}
