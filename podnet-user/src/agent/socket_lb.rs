//! The socket LB's links (`--socket-lb-cgroup`, see
//! `podnet_common::socket_lb`): attached to the configured cgroup at every
//! start (this build's programs replace the previous agent's without a
//! gap), removed when the agent starts without the flag. Pinned, as the
//! node devices' links: they outlive the agent, so connections keep being
//! translated while it is down.

use anyhow::Context as _;
use tracing::info;

use super::Agent;
use crate::datapath::detach_socket_lb;

impl Agent {
    /// Makes the socket LB's links match the configuration.
    pub(super) fn apply_socket_lb(&mut self) -> anyhow::Result<()> {
        let pins = self.config.socket_lb_links_dir();
        if let Some(cgroup) = self.config.socket_lb_cgroup.clone() {
            self.datapath
                .attach_socket_lb(&cgroup, &pins)
                .with_context(|| {
                    format!("attaching the socket LB to cgroup {}", cgroup.display())
                })?;
            info!(cgroup = %cgroup.display(), "socket LB attached: the cgroup's connections to ClusterIPs and to this node's NodePorts are translated at connect");
        } else {
            let removed = detach_socket_lb(&pins).context("detaching the socket LB")?;
            if removed > 0 {
                info!(
                    links = removed,
                    "socket LB detached (no --socket-lb-cgroup)"
                );
            }
        }
        Ok(())
    }
}
