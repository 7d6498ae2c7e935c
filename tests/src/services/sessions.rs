//! Long-lived connections through the demo Service, held across whatever a
//! test does to the agents (restarts, an upgrade to another build): a TCP
//! session to each backend and a UDP flow with a fixed 5-tuple. A check
//! fails when a session breaks or when the UDP flow is answered by another
//! backend than before (a re-balanced flow is a broken one for a client
//! that holds state on its backend).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::Context as _;

use super::{ServiceSpec, TRIES, TcpSession, UdpSession, tcp_session, udp_session};
use crate::lab::LabLayout;

/// One TCP session per backend of the demo Service and one UDP flow, all
/// from one pod.
pub struct ServiceSessions {
    /// Backend name to the session it answered.
    tcp: BTreeMap<String, TcpSession>,
    udp: UdpSession,
    udp_backend: String,
}

impl ServiceSessions {
    /// Opens the sessions from pod `client` of `layout` to the lab's demo
    /// Service's ClusterIP.
    pub fn to_cluster_ip(layout: &LabLayout, client: &str) -> anyhow::Result<Self> {
        let svc = service(layout)?;
        let netns = &layout
            .pod(client)
            .with_context(|| format!("no pod {client}"))?
            .netns;
        Self::open(netns, &svc, (svc.cluster_ip, svc.tcp_port, svc.udp_port))
    }

    /// Opens the sessions from the lab's fabric host (outside the cluster)
    /// to the demo Service's NodePorts on `node`.
    pub fn to_node_port(layout: &LabLayout, node: &str) -> anyhow::Result<Self> {
        let svc = service(layout)?;
        let node_ip = layout
            .node(node)
            .with_context(|| format!("no node {node}"))?
            .node_ip;
        Self::open(
            &layout.fabric_netns,
            &svc,
            (node_ip, svc.node_port, svc.udp_node_port),
        )
    }

    /// Connections from `netns` to `(address, tcp port, udp port)` until
    /// every backend of `svc` has one (the Service picks at random), and
    /// the UDP flow with its first answer.
    fn open(
        netns: &str,
        svc: &ServiceSpec,
        frontend: (Ipv4Addr, u16, u16),
    ) -> anyhow::Result<Self> {
        let (address, tcp_port, udp_port) = frontend;
        let addr = SocketAddrV4::new(address, tcp_port);
        let mut tcp = BTreeMap::new();
        for _ in 0..TRIES {
            let session = tcp_session(netns, addr)?;
            tcp.entry(session.backend.clone()).or_insert(session);
            if tcp.len() == svc.backends.len() {
                break;
            }
        }
        anyhow::ensure!(
            tcp.len() == svc.backends.len(),
            "{TRIES} connections from {netns} to {addr} reached only {:?}",
            tcp.keys().collect::<Vec<_>>()
        );
        let udp = udp_session(netns, SocketAddrV4::new(address, udp_port))?;
        let udp_backend = udp.ask().context("the UDP flow's first answer")?;
        Ok(Self {
            tcp,
            udp,
            udp_backend,
        })
    }

    /// Every TCP session still echoes, and the UDP flow is still answered
    /// by its first backend; `when` names the moment in the error.
    pub fn check(&mut self, when: &str) -> anyhow::Result<()> {
        for (backend, session) in &mut self.tcp {
            session
                .echo(when.as_bytes())
                .with_context(|| format!("the TCP session to {backend} {when}"))?;
        }
        let answered = self
            .udp
            .ask()
            .with_context(|| format!("the UDP flow {when}"))?;
        anyhow::ensure!(
            answered == self.udp_backend,
            "the UDP flow moved from {} to {answered} {when}",
            self.udp_backend
        );
        Ok(())
    }
}

fn service(layout: &LabLayout) -> anyhow::Result<ServiceSpec> {
    layout.service.clone().context("the lab has no Service")
}
