//! What a lab is checked with: probes of every path (pod to pod, pod to
//! node, egress, the Service, what the agents agree on).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    matrix::CheckPlan,
    model::{FABRIC_HOST, LabLayout, ServiceKind},
};
use crate::{
    netns::{command_in, run_in, spawn_in},
    services::{self, ServiceSpec},
};

/// One cell of the connectivity matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub kind: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// One ping from `netns` to `target`, answered within a second.
pub fn ping(netns: &str, target: Ipv4Addr) -> bool {
    let once = || {
        command_in(netns, "ping")
            .and_then(|mut c| {
                Ok(c.args(["-c", "1", "-W", "1", &target.to_string()])
                    .output()?)
            })
            .is_ok_and(|o| o.status.success())
    };
    // Once more on a miss: one echo on a loaded 2-core machine can go
    // unanswered within its second (seen: a pod -> its own node probe while
    // other labs ran), which says nothing about the path; a broken path
    // fails both.
    once() || once()
}

/// Full connectivity check: pod <-> pod, pod -> node, node -> pod (every
/// pair in a small lab, a stated sample in a large one: [`check_plan`];
/// the pings run in parallel), pod ->
/// the fabric host with the source masqueraded to the pod's node IP, and,
/// when the lab has the demo Service, pod -> Service (TCP, UDP) and the
/// fabric host -> every node's NodePort.
pub fn check(layout: &LabLayout) -> anyhow::Result<Vec<Probe>> {
    let mut probes = matrix_probes(layout, &check_plan(layout));
    // Egress: a TCP listener on the fabric host sees who connects.
    let port = 17_000;
    let fabric = layout.fabric_netns.clone();
    let expected = layout.pods.len();
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = spawn_in(
        &fabric,
        move || -> anyhow::Result<BTreeMap<String, Ipv4Addr>> {
            let listener = TcpListener::bind(SocketAddrV4::new(FABRIC_HOST, port))?;
            listener.set_nonblocking(false)?;
            tx.send(()).ok();
            let mut seen = BTreeMap::new();
            // 640 pods connecting one after the other took longer than
            // 10 s: the listener waits longer in a larger lab.
            let deadline = Instant::now()
                + Duration::from_secs(10)
                + Duration::from_millis(50) * u32::try_from(expected).unwrap_or(u32::MAX / 50);
            while seen.len() < expected && Instant::now() < deadline {
                let (mut stream, peer) = listener.accept()?;
                let mut name = String::new();
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let _ = stream.read_to_string(&mut name);
                if name == EGRESS_DONE {
                    break;
                }
                if let std::net::SocketAddr::V4(peer) = peer {
                    seen.insert(name, *peer.ip());
                }
            }
            Ok(seen)
        },
    )?;
    rx.recv_timeout(Duration::from_secs(5)).ok();
    for pod in &layout.pods {
        let name = pod.name.clone();
        let connected = run_in(&pod.netns, move || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(
                &SocketAddrV4::new(FABRIC_HOST, port).into(),
                Duration::from_secs(2),
            )?;
            s.write_all(name.as_bytes())
        })?;
        if let Err(e) = connected {
            probes.push(Probe {
                from: pod.name.clone(),
                to: "fabric host".into(),
                kind: "egress (masqueraded)",
                ok: false,
                detail: e.to_string(),
            });
        }
    }
    // Every pod has tried: a pod that could not connect must not leave the
    // listener waiting in accept().
    let _ = run_in(&fabric, move || -> std::io::Result<()> {
        TcpStream::connect(SocketAddrV4::new(FABRIC_HOST, port))?.write_all(EGRESS_DONE.as_bytes())
    });
    let seen = listener
        .join()
        .map_err(|_| anyhow::anyhow!("listener panicked"))??;
    for pod in &layout.pods {
        let node_ip = layout.node(&pod.node).map(|n| n.node_ip);
        if let Some(src) = seen.get(&pod.name) {
            probes.push(Probe {
                from: pod.name.clone(),
                to: "fabric host".into(),
                kind: "egress (masqueraded)",
                ok: Some(*src) == node_ip,
                detail: format!("seen from {src}"),
            });
        }
    }
    if let Some(svc) = &layout.service {
        probes.extend(service_probes(layout, svc));
    }
    probes.extend(consistency_probes(layout));
    Ok(probes)
}

/// The pod and node paths [`check`] probes in `layout` (all of them in a
/// small lab, a stated sample in a large one).
#[must_use]
pub fn check_plan(layout: &LabLayout) -> CheckPlan {
    let pod_nodes: Vec<usize> = layout
        .pods
        .iter()
        .map(|p| {
            layout
                .nodes
                .iter()
                .position(|n| n.name == p.node)
                .unwrap_or(usize::MAX)
        })
        .collect();
    CheckPlan::new(&pod_nodes, layout.nodes.len())
}

/// Pings in flight at once: each is a process mostly waiting for its
/// echo, so more than the machine's cores.
const PARALLEL_PINGS: usize = 16;

/// The plan's pod and node probes, [`PARALLEL_PINGS`] at a time, in the
/// plan's order.
fn matrix_probes(layout: &LabLayout, plan: &CheckPlan) -> Vec<Probe> {
    let (pods, nodes) = (&layout.pods, &layout.nodes);
    let mut cells: Vec<(&str, Probe, Ipv4Addr)> = Vec::with_capacity(plan.probes());
    let cell = |from: &str, to: &str, kind: &'static str, target: Ipv4Addr| Probe {
        from: from.to_owned(),
        to: to.to_owned(),
        kind,
        ok: false,
        detail: target.to_string(),
    };
    for &(a, b) in &plan.pod_pairs {
        let (Some(a), Some(b)) = (pods.get(a), pods.get(b)) else {
            continue;
        };
        let kind = if a.node == b.node {
            "pod->pod same node"
        } else {
            "pod->pod cross node"
        };
        cells.push((&a.netns, cell(&a.name, &b.name, kind, b.ip), b.ip));
    }
    for &(p, n) in &plan.pod_to_node {
        let (Some(p), Some(n)) = (pods.get(p), nodes.get(n)) else {
            continue;
        };
        cells.push((
            &p.netns,
            cell(&p.name, &n.name, "pod->node", n.node_ip),
            n.node_ip,
        ));
    }
    for &(n, p) in &plan.node_to_pod {
        let (Some(n), Some(p)) = (nodes.get(n), pods.get(p)) else {
            continue;
        };
        cells.push((&n.netns, cell(&n.name, &p.name, "node->pod", p.ip), p.ip));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(vec![None; cells.len()]);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_PINGS.min(cells.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((netns, _, target)) = cells.get(i) else {
                        break;
                    };
                    let ok = ping(netns, *target);
                    if let Ok(mut done) = done.lock() {
                        done[i] = Some(ok);
                    }
                }
            });
        }
    });
    let done = done.into_inner().unwrap_or_default();
    let mut confirmations = 0;
    cells
        .into_iter()
        .zip(done)
        .map(|((netns, mut probe, target), ok)| {
            probe.ok = ok == Some(true);
            // A miss among many pings in flight on a loaded 2-core machine
            // is asked again alone (a 40-node lab's first parallel check
            // missed 9 % of its paths; those tried again answered when
            // pinged alone); a broken path misses again.
            if !probe.ok && confirmations < MAX_CONFIRMATIONS {
                confirmations += 1;
                probe.ok = ping(netns, target);
            }
            probe
        })
        .collect()
}

/// What the check itself sends the egress listener once every pod has
/// tried (no pod is named so).
const EGRESS_DONE: &str = "-- every pod has tried --";

/// Misses of the parallel pass pinged again one at a time; beyond this
/// many the check reports them as they are (that many broken paths need no
/// confirmation, and each one costs two seconds).
const MAX_CONFIRMATIONS: usize = 500;

/// Per node: the agent's state against the kernel's (`podnetctl nodes
/// --check`), and the nodes it forwards to against the datastore (the
/// nodes file; with etcd, against the other agents' own view of themselves).
fn consistency_probes(layout: &LabLayout) -> Vec<Probe> {
    use podnet::api::{Client, Drift, Request};
    let mut probes = Vec::new();
    for n in &layout.nodes {
        let client = Client::new(&n.agent_socket);
        let (ok, detail) = match client.call::<Vec<Drift>>(&Request::Check) {
            Ok(drift) if drift.is_empty() => (true, "maps, routes, veths, filters".to_owned()),
            Ok(drift) => (
                false,
                drift
                    .iter()
                    .map(|d| format!("{}: {}", d.kind, d.detail))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Err(e) => (false, e.to_string()),
        };
        probes.push(Probe {
            from: n.name.clone(),
            to: "its kernel state".into(),
            kind: "consistency",
            ok,
            detail,
        });
        // Every other node of the lab, as the datastore has it.
        let want: BTreeMap<String, String> = layout
            .nodes
            .iter()
            .filter(|other| other.name != n.name)
            .map(|other| (other.name.clone(), other.pod_cidr.clone()))
            .collect();
        let (ok, detail) = match client.call::<Vec<podnet::datastore::NodeRecord>>(&Request::Nodes)
        {
            Ok(list) => {
                let have: BTreeMap<String, String> = list
                    .into_iter()
                    .map(|r| (r.name, r.pod_cidr.to_string()))
                    .collect();
                (have == want, format!("{have:?}"))
            }
            Err(e) => (false, e.to_string()),
        };
        probes.push(Probe {
            from: n.name.clone(),
            to: "the datastore".into(),
            kind: "consistency",
            ok,
            detail,
        });
    }
    probes
}

/// How long a Service probe waits for its answer.
const SERVICE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries per Service cell: each picks a backend at random, so one query
/// would pass a cell half the time when only the path to one backend works.
const SERVICE_PROBE_QUERIES: usize = 6;

type ServiceAnswer = anyhow::Result<(String, SocketAddrV4)>;

/// One Service cell: [`SERVICE_PROBE_QUERIES`] queries at once, ok when
/// every one was answered by a backend; the detail says who answered.
fn service_cell(
    addr: SocketAddrV4,
    backends: &[&str],
    query: impl Fn() -> ServiceAnswer + Sync,
) -> (bool, String) {
    let answers: Vec<ServiceAnswer> = std::thread::scope(|scope| {
        let jobs: Vec<_> = (0..SERVICE_PROBE_QUERIES)
            .map(|_| scope.spawn(&query))
            .collect();
        jobs.into_iter()
            .map(|job| {
                job.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked")))
            })
            .collect()
    });
    // Backend -> (answers, a source address it saw).
    let mut answered: BTreeMap<String, (usize, SocketAddrV4)> = BTreeMap::new();
    let mut failures = Vec::new();
    for answer in answers {
        match answer {
            Ok((name, seen)) if backends.contains(&name.as_str()) => {
                answered.entry(name).or_insert((0, seen)).0 += 1;
            }
            Ok((name, seen)) => failures.push(format!("{name:?} is not a backend (saw {seen})")),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let who: Vec<String> = answered
        .iter()
        .map(|(name, (n, seen))| format!("{name} x{n} (saw {seen})"))
        .collect();
    let detail = if failures.is_empty() {
        format!("{addr} answered by {}", who.join(", "))
    } else {
        format!(
            "{addr}: {} of {SERVICE_PROBE_QUERIES} failed ({}){}",
            failures.len(),
            failures[0],
            if who.is_empty() {
                String::new()
            } else {
                format!("; answered by {}", who.join(", "))
            }
        )
    };
    (failures.is_empty(), detail)
}

/// The demo Service's rows: every pod to its ClusterIP over TCP and UDP,
/// and the fabric host to every node's NodePort (kube-proxy's rules or
/// podnet's datapath; the nftables variant has no NodePort). Run in
/// parallel: a broken path
/// costs a timeout per query.
fn service_probes(layout: &LabLayout, svc: &ServiceSpec) -> Vec<Probe> {
    let backends: Vec<&str> = layout.servers.iter().map(|s| s.pod.as_str()).collect();
    let backends = backends.as_slice();
    let tcp = SocketAddrV4::new(svc.cluster_ip, svc.tcp_port);
    let udp = SocketAddrV4::new(svc.cluster_ip, svc.udp_port);
    std::thread::scope(|scope| {
        let mut jobs = Vec::new();
        for pod in &layout.pods {
            let netns = pod.netns.as_str();
            jobs.push((
                pod.name.clone(),
                "svc tcp".to_owned(),
                "pod->service tcp",
                scope.spawn(move || {
                    service_cell(tcp, backends, || {
                        services::tcp_query(netns, tcp, SERVICE_PROBE_TIMEOUT)
                    })
                }),
            ));
            jobs.push((
                pod.name.clone(),
                "svc udp".to_owned(),
                "pod->service udp",
                scope.spawn(move || {
                    service_cell(udp, backends, || {
                        services::udp_query(netns, udp, SERVICE_PROBE_TIMEOUT)
                    })
                }),
            ));
        }
        if matches!(
            layout.service_kind,
            Some(ServiceKind::KubeProxyIptables | ServiceKind::Datapath)
        ) {
            let fabric = layout.fabric_netns.as_str();
            for node in &layout.nodes {
                let addr = SocketAddrV4::new(node.node_ip, svc.node_port);
                jobs.push((
                    "fabric host".to_owned(),
                    node.name.clone(),
                    "nodeport",
                    scope.spawn(move || {
                        service_cell(addr, backends, || {
                            services::tcp_query(fabric, addr, SERVICE_PROBE_TIMEOUT)
                        })
                    }),
                ));
            }
        }
        jobs.into_iter()
            .map(|(from, to, kind, job)| {
                let (ok, detail) = job
                    .join()
                    .unwrap_or_else(|_| (false, "probe thread panicked".to_owned()));
                Probe {
                    from,
                    to,
                    kind,
                    ok,
                    detail,
                }
            })
            .collect()
    })
}
