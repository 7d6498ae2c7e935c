//! What an endpoint needs of the kernel besides the datapath's maps: its
//! bandwidth shapers (tbf on the host veth, an ifb for egress) and the
//! check that its filters are really attached.

use anyhow::Context as _;
use tracing::warn;

use crate::{
    endpoint::{Endpoint, shaper_ifname},
    netlink,
};

/// Puts the endpoint's bandwidth limits in place (see [`crate::shaping`]):
/// a tbf on the host veth for an ingress limit, an ifb with a tbf for an
/// egress limit. Idempotent (a restart re-applies it). Returns the
/// endpoint flags and the shaper's ifindex (0: none) for the datapath.
pub(super) fn apply_shaping(ep: &Endpoint) -> anyhow::Result<(u32, u32)> {
    use podnet_common::endpoint::{ENDPOINT_F_NONE, ENDPOINT_F_SHAPED_INGRESS};
    let Some(bandwidth) = ep.bandwidth.filter(|b| !b.is_zero()) else {
        return Ok((ENDPOINT_F_NONE, 0));
    };
    if bandwidth.egress().is_some() {
        // A shaped pod's sends leave its shaper into the host stack, which
        // routes them (also to pods of this node): the node must forward,
        // in every mode. The node network's setup turns forwarding on as
        // well, but an endpoint can be installed before that setup has
        // succeeded (it is retried).
        crate::agent::cluster::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    }
    let host_ifindex = ep.host_ifindex;
    let shaper = shaper_ifname(&ep.host_ifname);
    let (flags, shaper_ifindex) = netlink::with_netlink(None, move |handle| async move {
        let mut flags = ENDPOINT_F_NONE;
        if let Some(tbf) = bandwidth.ingress() {
            netlink::replace_root_tbf(&handle, host_ifindex, &tbf).await?;
            flags |= ENDPOINT_F_SHAPED_INGRESS;
        }
        let mut shaper_ifindex = 0;
        if let Some(tbf) = bandwidth.egress() {
            let mtu = netlink::link_by_index(&handle, host_ifindex)
                .await?
                .map_or(1500, |link| link.mtu);
            shaper_ifindex = netlink::ensure_ifb(&handle, &shaper, mtu).await?;
            netlink::replace_root_tbf(&handle, shaper_ifindex, &tbf).await?;
        }
        Ok((flags, shaper_ifindex))
    })
    .with_context(|| {
        format!(
            "putting the bandwidth limits ({bandwidth}) in place on {}",
            ep.host_ifname
        )
    })?;
    Ok((flags, shaper_ifindex))
}

/// Deletes the endpoint's shaper (ifb), if it has one; the tbf on its host
/// veth goes with the veth.
pub(super) fn remove_shaper(ep: &Endpoint) {
    if ep.bandwidth.and_then(|b| b.egress()).is_none() {
        return;
    }
    let name = shaper_ifname(&ep.host_ifname);
    let deleted = netlink::with_netlink(None, {
        let name = name.clone();
        move |handle| async move { netlink::delete_link(&handle, &name).await }
    });
    if let Err(e) = deleted {
        warn!(error = %format!("{e:#}"), %name, "removing an endpoint's shaper; the next start removes it");
    }
}

/// Which of `ifindexes` (in the agent's netns) carry both of podnet's
/// filters (from_pod on ingress, to_pod on egress): what the kernel says,
/// not what the agent believes it did.
pub(in crate::agent) fn veths_with_pod_filters(
    ifindexes: Vec<u32>,
) -> anyhow::Result<std::collections::HashSet<u32>> {
    use crate::{datapath::POD_TC_PRIORITY, netlink::has_bpf_filter};

    let attached = netlink::with_netlink(None, move |handle| async move {
        let mut attached = std::collections::HashSet::new();
        for index in ifindexes {
            if has_bpf_filter(&handle, index, POD_TC_PRIORITY, false).await?
                && has_bpf_filter(&handle, index, POD_TC_PRIORITY, true).await?
            {
                attached.insert(index);
            }
        }
        Ok(attached)
    })?;
    Ok(attached)
}

/// How the programs are attached, for status output: pod veths always by a
/// `cls_bpf` filter (see `Datapath::attach_pod_program` for why), the node's
/// own devices by TCX where the kernel has it (Linux >= 6.6).
#[must_use]
pub fn attach_mode() -> &'static str {
    use aya::util::KernelVersion;
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
        "pods: clsact (cls_bpf); node devices: tcx"
    } else {
        "pods: clsact (cls_bpf); node devices: clsact"
    }
}
