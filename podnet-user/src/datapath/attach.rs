//! Attaching the programs: podnet's filters on pod veths (cls_bpf on
//! clsact), the node devices' TCX links, and re-pointing pinned links.

use std::path::Path;

use aya::programs::{
    TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use podnet_common::names;

use super::{Datapath, DatapathError, prog_err};

/// `pref` of podnet's filters on a pod veth's clsact ingress (from_pod) and
/// egress (to_pod); the first, so nothing another tool adds later runs
/// before the anti-spoofing, and to_pod sees every packet the stack sends.
pub const POD_TC_PRIORITY: u16 = 1;
/// Filter handle of podnet's filters at [`POD_TC_PRIORITY`].
pub const POD_TC_HANDLE: TcHandle = TcHandle::new(0, 1);

/// podnet's two programs on a pod's host veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodProgram {
    /// Ingress: every packet the pod sends.
    FromPod,
    /// Egress: every packet the host stack delivers to the pod.
    ToPod,
}

impl PodProgram {
    pub const BOTH: [Self; 2] = [Self::FromPod, Self::ToPod];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::FromPod => names::PROG_FROM_POD,
            Self::ToPod => names::PROG_TO_POD,
        }
    }

    #[must_use]
    pub const fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromPod => TcAttachType::Ingress,
            Self::ToPod => TcAttachType::Egress,
        }
    }
}

/// podnet's programs on one of the node's own devices (TCX, pinned links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeProgram {
    pub name: &'static str,
    pub attach_type: TcAttachType,
}

impl NodeProgram {
    /// Ingress of the VXLAN device: delivers what other nodes sent.
    pub const FROM_OVERLAY: Self = Self {
        name: names::PROG_FROM_OVERLAY,
        attach_type: TcAttachType::Ingress,
    };
    /// Egress of the VXLAN device: tracks what the stack sends through it.
    pub const TO_OVERLAY: Self = Self {
        name: names::PROG_TO_OVERLAY,
        attach_type: TcAttachType::Egress,
    };
    /// Ingress of the underlay device (direct mode).
    pub const FROM_UNDERLAY: Self = Self {
        name: names::PROG_FROM_UNDERLAY,
        attach_type: TcAttachType::Ingress,
    };
    /// Egress of the underlay device (direct mode).
    pub const TO_UNDERLAY: Self = Self {
        name: names::PROG_TO_UNDERLAY,
        attach_type: TcAttachType::Egress,
    };
}

/// Leaves a netlink-attached filter in place: aya detaches a link when its
/// handle is dropped, but podnet's filter must outlive the agent (it goes
/// when the veth does). A netlink link holds no file descriptor or memory
/// beyond the handle itself, so forgetting it leaks nothing.
fn keep_tc_filter(link: SchedClassifierLink) {
    std::mem::forget(link);
}

impl Datapath {
    /// Attaches podnet's programs to the pod veth `ifname` (in this thread's
    /// netns): from_pod on its TC ingress, to_pod on its TC egress; see
    /// [`Self::attach_pod_program`].
    pub fn attach_pod(&mut self, ifname: &str, replace: bool) -> Result<(), DatapathError> {
        for program in PodProgram::BOTH {
            self.attach_pod_program(program, ifname, replace)?;
        }
        Ok(())
    }

    /// Attaches `program` to the pod veth `ifname` as podnet's
    /// direct-action `cls_bpf` filter on a `clsact` qdisc, at
    /// [`POD_TC_PRIORITY`] / [`POD_TC_HANDLE`]. The filter lives as long as
    /// the veth; no pin, no process holds it.
    ///
    /// Why not TCX (which the node's own devices use): every TCX attach
    /// waits for an RCU grace period (`tcx_entry_sync()` is
    /// `synchronize_rcu()`) while holding the RTNL lock. Measured on this
    /// machine: 8 ms per TCX attach against 0.15-0.8 ms for clsact +
    /// `cls_bpf`; that was half of a CNI ADD, and every other netlink user
    /// on the node (parallel ADDs included) waited behind it.
    ///
    /// With `replace`, podnet's filter already on the veth (agent restart)
    /// gets the new program in place: `cls_bpf` swaps it under RCU, so no
    /// packet meets a veth without a program. Without one, it is created.
    pub fn attach_pod_program(
        &mut self,
        pod_program: PodProgram,
        ifname: &str,
        replace: bool,
    ) -> Result<(), DatapathError> {
        let (name, attach_type) = (pod_program.name(), pod_program.attach_type());
        let program = self.classifier(name)?;
        let tc_err = |action: &'static str| {
            move |source: aya::programs::ProgramError| DatapathError::TcFilter {
                ifname: ifname.to_owned(),
                action,
                source: Box::new(source),
            }
        };
        if replace
            && let Ok(existing) = SchedClassifierLink::attached(
                ifname,
                attach_type,
                POD_TC_PRIORITY,
                POD_TC_HANDLE,
                None,
            )
            // Fails (ENOENT) when the filter is not there: created below.
            && let Ok(id) = program.attach_to_link(existing)
        {
            keep_tc_filter(program.take_link(id).map_err(tc_err("taking the link"))?);
            return Ok(());
        }
        match aya::programs::tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(aya::programs::TcError::NetlinkError(e))
                if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(DatapathError::TcFilter {
                    ifname: ifname.to_owned(),
                    action: "adding the clsact qdisc",
                    source: Box::new(source),
                });
            }
        }
        let id = program
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::Netlink(NlOptions {
                    priority: POD_TC_PRIORITY,
                    handle: POD_TC_HANDLE,
                    classid: None,
                }),
            )
            .map_err(tc_err(match pod_program {
                PodProgram::FromPod => "adding the from_pod cls_bpf filter (ingress)",
                PodProgram::ToPod => "adding the to_pod cls_bpf filter (egress)",
            }))?;
        keep_tc_filter(program.take_link(id).map_err(tc_err("taking the link"))?);
        Ok(())
    }

    /// Attaches `program` to `ifname` by TCX and pins the link at `pin`
    /// (see [`Self::attach_pod_program`] for why pods differ).
    pub fn attach_node_program(
        &mut self,
        node_program: NodeProgram,
        ifname: &str,
        pin: &Path,
    ) -> Result<(), DatapathError> {
        let name = node_program.name;
        let program = self.classifier(name)?;
        let link_id = program
            .attach(ifname, node_program.attach_type)
            .map_err(prog_err(name, "attaching by TCX"))?;
        let link = program
            .take_link(link_id)
            .map_err(prog_err(name, "taking the link"))?;
        let fd_link: FdLink = link.try_into().map_err(|source| DatapathError::Link {
            name,
            action: format!("{ifname}: the attachment is not a bpf_link (no TCX?)"),
            source: Box::new(source),
        })?;
        let _ = std::fs::remove_file(pin);
        fd_link.pin(pin).map_err(|source| DatapathError::Pin {
            path: pin.to_owned(),
            source: Box::new(source),
        })?;
        Ok(())
    }

    /// Points the pinned link at `pin` to this datapath's from_pod
    /// (`bpf_link_update`: atomic, no packet sees no program). Used after a
    /// restart, when the running link still holds the previous program.
    pub fn reattach_from_pod(&mut self, pin: &Path) -> Result<(), DatapathError> {
        self.reattach(names::PROG_FROM_POD, pin)
    }

    /// Points the pinned link at `pin` to program `name` of this datapath.
    pub fn reattach(&mut self, name: &'static str, pin: &Path) -> Result<(), DatapathError> {
        let pinned = PinnedLink::from_pin(pin).map_err(|source| DatapathError::Link {
            name,
            action: format!("opening the pinned link {}", pin.display()),
            source: Box::new(source),
        })?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
            DatapathError::Link {
                name,
                action: format!("{} is not a TC link", pin.display()),
                source: Box::new(source),
            }
        })?;
        let program = self.classifier(name)?;
        let link_id = program
            .attach_to_link(link)
            .map_err(prog_err(name, "replacing the program of a pinned link"))?;
        // The pin keeps the link; our fd copy can go.
        let _ = program.take_link(link_id);
        Ok(())
    }
}
