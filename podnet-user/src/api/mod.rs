//! The agent's unix-socket API, used by the CNI plugin and podnetctl.
//!
//! One request per connection: the client writes one JSON line, the agent
//! answers one JSON line (`{"ok": ...}` or `{"error": "..."}`) and closes.
//! Plain JSON lines keep it debuggable with `socat` and cheap for a CNI
//! plugin that exits right after.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub mod explain;
pub mod policy;
pub mod services;
pub mod tables;

pub use crate::endpoint::Endpoint;
use crate::{endpoint::Owner, ipam::Reservation, model::NodeStatus};

/// Default path of the agent socket.
pub const DEFAULT_SOCKET: &str = "/run/podnet/podnetd.sock";

/// Where the agent leaves a copy of its [`NodeInfo`] next to its socket, so
/// that DEL and GC find the IPAM store while the agent is down.
#[must_use]
pub fn node_info_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".node.json");
    PathBuf::from(name)
}

/// The copy of the agent's [`NodeInfo`] next to `socket`, if readable.
#[must_use]
pub fn cached_node_info(socket: &Path) -> Option<NodeInfo> {
    serde_json::from_slice(&std::fs::read(node_info_path(socket)).ok()?).ok()
}

/// What the agent knows about its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_name: String,
    /// The node's pod CIDR, e.g. `10.244.0.0/24`.
    pub pod_cidr: ipnet::Ipv4Net,
    pub cluster_cidr: ipnet::Ipv4Net,
    /// The pods' gateway (first address of the pod CIDR).
    pub gateway: Ipv4Addr,
    /// MTU for pod interfaces.
    pub mtu: u32,
    /// The built-in IPAM's root: the node store is `<ipam_dir>/_node`,
    /// shared by every network (old per-network stores are
    /// `<ipam_dir>/<network>`).
    pub ipam_dir: PathBuf,
}

/// An endpoint with its datapath state, for `podnetctl endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub endpoint: Endpoint,
    /// The endpoint is in the datapath's map.
    pub in_datapath: bool,
    /// from_pod is attached (podnet's `cls_bpf` filter is on the veth, as
    /// the kernel reports it, or a pinned TCX link of an older podnet).
    pub attached: bool,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// Counter totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterTotals {
    pub verdicts: std::collections::BTreeMap<String, u64>,
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// An IP protocol number as operators read it: `tcp`, `udp`, `icmp`,
/// `sctp`, or the number.
#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        132 => "sctp".to_owned(),
        other => other.to_string(),
    }
}

/// A flow the datapath hands to the host stack, for `podnetctl flows`: the
/// direction that goes to the stack (a Service backend's replies, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackFlowStatus {
    /// `tcp`, `udp`, `icmp`, `sctp` or the protocol number.
    pub proto: String,
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
    /// Seconds since the last packet of the flow, either direction.
    pub idle_s: u64,
    /// `open`, `closing` (one FIN), `closed` (RST or both FINs; expires soon)
    /// or `expired` (no longer followed; the LRU map reuses the slot).
    pub state: String,
}

/// One endpoint's share of the stack-flows table (`podnetctl flows
/// --owners`): what bounds the flows one pod can make the node follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowShare {
    /// The endpoint's pod IP.
    pub ip: Ipv4Addr,
    /// Entries charged to it (as of the agent's last recount, a few
    /// seconds ago at most, plus the inserts since).
    pub flows: u32,
    /// Its flows not tracked because it held its limit.
    pub refused: u32,
    /// Its limit.
    pub limit: u32,
}

impl StackFlowStatus {
    /// Describes an entry of the stack-flows map at monotonic time `now_ns`
    /// (`CLOCK_MONOTONIC_COARSE`, the programs' clock).
    #[must_use]
    pub fn new(key: &podnet_common::FlowKey, flow: &podnet_common::StackFlow, now_ns: u64) -> Self {
        use podnet_common::flow::FLOW_F_BOTH_FINS;
        let proto = proto_name(key.proto);
        let idle_s = now_ns.saturating_sub(flow.last_seen_ns) / 1_000_000_000;
        let state = if flow.expired(key.proto, now_ns) {
            "expired"
        } else if flow.closed() {
            "closed"
        } else if flow.flags & FLOW_F_BOTH_FINS != 0 {
            "closing"
        } else {
            "open"
        };
        Self {
            proto,
            src: Ipv4Addr::from(key.src.to_ne_bytes()),
            src_port: u16::from_be(key.src_port),
            dst: Ipv4Addr::from(key.dst.to_ne_bytes()),
            dst_port: u16::from_be(key.dst_port),
            idle_s,
            state: state.to_owned(),
        }
    }
}

/// Agent health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: NodeInfo,
    pub endpoints: usize,
    pub attach_mode: String,
    pub bpffs_dir: PathBuf,
    pub programs: Vec<String>,
    /// What the agent could not set up yet and retries (the node's network,
    /// endpoints whose filters failed to attach); empty when all is in
    /// place. Absent from older agents' answers.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Endpoint records the agent could not read at start, kept aside
    /// (never deleted) for an operator to look at; their endpoints are not
    /// installed. Absent from older agents' answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable_records: Vec<PathBuf>,
    /// The cluster objects the agent holds and its pods' records in the
    /// datastore; absent with no datastore, and from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_objects: Option<ClusterObjectsStatus>,
    /// Who translates Services and how far the datapath's maps are; absent
    /// from older agents' answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<services::ServicesStatus>,
    /// How full the bounded flow tables are (connections, stack flows),
    /// counted from the pins after the agent's lock is released; absent
    /// from older agents' answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<tables::TableFill>,
    /// Why the tables could not be counted, when they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables_error: Option<String>,
}

/// What the agent holds of the cluster objects (from its watch of the
/// datastore) and how far its own pods' endpoint records are published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterObjectsStatus {
    /// `file` or `etcd`.
    pub backend: String,
    /// The watch is open (it has listed and follows the changes).
    pub connected: bool,
    /// The datastore revision the agent's view has applied (0: none yet);
    /// a node behind the others shows a lower one.
    pub revision: i64,
    /// Objects held by kind (the API's plural: `namespaces`, `pods`, ...),
    /// every kind, zeros included.
    pub counts: std::collections::BTreeMap<String, usize>,
    /// Endpoint records (pod IP, namespace, name, node) held, every node's.
    pub pod_records: usize,
    /// How many times the watch listed everything again after the first
    /// list (a compaction or a lost watch).
    pub resyncs: u64,
    /// Values under the datastore's prefixes the agent could not read (not
    /// an object of a known kind, not an endpoint record): left out.
    #[serde(default)]
    pub unreadable: usize,
    /// Why the watch last failed or was lost, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// This node's endpoint records.
    pub publish: PublishStatus,
    /// The NetworkPolicy sync (absent from an agent without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<policy::PolicyStatus>,
}

impl ClusterObjectsStatus {
    /// One line for `podnetctl status`: `revision 123, namespaces 3, pods
    /// 9, networkpolicies 2, services 1, endpointslices 1, pod records 9
    /// (1 resync)`, then whatever is wrong.
    #[must_use]
    pub fn summary(&self) -> String {
        let kinds = crate::model::cluster::ALL_KINDS.map(crate::model::cluster::Kind::plural);
        let mut parts = vec![format!("revision {}", self.revision)];
        // The known kinds in the API's order, then any a newer agent adds.
        let others = self
            .counts
            .keys()
            .map(String::as_str)
            .filter(|k| !kinds.contains(k));
        for kind in kinds.into_iter().chain(others) {
            parts.push(format!(
                "{kind} {}",
                self.counts.get(kind).copied().unwrap_or_default()
            ));
        }
        parts.push(format!("pod records {}", self.pod_records));
        let mut line = format!(
            "{} ({} resync{})",
            parts.join(", "),
            self.resyncs,
            if self.resyncs == 1 { "" } else { "s" }
        );
        if !self.connected {
            line.push_str("; NOT WATCHING");
            if let Some(e) = &self.last_error {
                line.push_str(": ");
                line.push_str(e);
            }
        }
        if self.unreadable > 0 {
            line.push_str("; ");
            line.push_str(&self.unreadable.to_string());
            line.push_str(" unreadable, left out");
        }
        line
    }
}

/// This node's endpoint records in the datastore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishStatus {
    /// Records the node should have published: one per endpoint with a pod
    /// namespace and name.
    pub records: usize,
    /// The datastore holds exactly these (as of the last write).
    pub in_sync: bool,
    /// The revision of the last successful publication.
    pub revision: i64,
    /// Failed attempts since the last success (retried with backoff).
    pub failures: u64,
    /// What is not published yet and why (empty when in sync).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One difference between what the agent believes and what the kernel
/// holds (`Request::Check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// What is compared: "remote map", "host route", "endpoint map",
    /// "veth", "filters", "node config", "service frontend", "service
    /// slot".
    pub kind: String,
    pub detail: String,
}

/// The agent's view of the datastore, for `podnetctl datastore` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreStatus {
    /// `none`, `file` or `etcd`.
    pub backend: String,
    /// The agent follows the datastore right now (etcd: published and
    /// watching; nodes file: the last read was a complete file). While not,
    /// the datapath forwards with the last state.
    pub connected: bool,
    /// The etcd member in use, or the nodes file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// When the agent last applied the datastore's state (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_ms: Option<u64>,
    /// Why it is not connected, or what it refused last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// How long routes to an unreachable node stay (etcd), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_grace_period_s: Option<u64>,
    /// How long after its lease expired a node's CIDR is released (etcd), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_release_after_s: Option<u64>,
    /// Every other node the datastore knows, and where it stands.
    pub nodes: Vec<NodeStatus>,
    /// What is wrong with the CIDR claims (etcd), e.g. a node holding a
    /// second CIDR: the operator's to look into (`podnetctl release`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claim_problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Node,
    Status,
    AddEndpoint {
        endpoint: Endpoint,
    },
    RemoveEndpoint {
        owner: Owner,
    },
    GetEndpoint {
        owner: Owner,
    },
    ListEndpoints,
    /// Remove every endpoint of `network` whose owner is not listed (CNI GC
    /// speaks for one network; other networks' endpoints are not its to
    /// judge). Without `network` (an older plugin) the agent refuses it.
    Gc {
        valid: Vec<Owner>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<String>,
    },
    Counters,
    Ipam,
    /// The other nodes the agent forwards to.
    Nodes,
    /// The datastore as the agent follows it.
    Datastore,
    /// Flows the datapath hands to the host stack.
    StackFlows,
    /// Each endpoint's share of the stack-flows table: [`FlowShare`]s.
    FlowShares,
    /// The agent's state against the kernel's: a list of [`Drift`].
    Check,
    /// What the datapath would do with a packet a local pod sends
    /// ([`crate::explain`]).
    Explain {
        request: explain::ExplainRequest,
    },
    /// The NetworkPolicies that select pod `namespace/name` and what their
    /// rules allow: a [`crate::policy::PodPolicies`], or `null` when the
    /// cluster has no such Pod.
    Policy {
        namespace: String,
        name: String,
    },
    /// The Services the datapath translates, their frontends and backends:
    /// a [`services::ServicesAnswer`].
    Services,
    /// A stream: the agent answers [`MonitorHello`], then writes one
    /// [`MonitorMessage`] line after another until the client hangs up.
    Monitor {
        /// Only drop events (today the only kind; kept for later kinds).
        #[serde(default)]
        drops_only: bool,
    },
}

/// The first answer to [`Request::Monitor`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorHello {
    /// The datapath's drop-event rate limit, events per second and CPU.
    pub drop_events_per_sec_per_cpu: u32,
}

/// One line of a monitor stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MonitorMessage {
    /// A packet the datapath dropped (boxed: the other messages are small,
    /// and a broadcast channel slot is as large as the largest).
    Drop(Box<DropEventRecord>),
    /// Drops of `reason` whose events the datapath did not send in the last
    /// second (over the per-CPU rate limit, or the ring buffer was full):
    /// counted, not reported one by one.
    Suppressed {
        /// When the agent counted them (Unix time, nanoseconds).
        time_unix_ns: u64,
        reason: String,
        count: u64,
    },
    /// Messages this client missed because it read too slowly (the agent
    /// never waits for a client).
    Lost { count: u64 },
}

/// A drop event with the pod it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEventRecord {
    /// When the datapath dropped it (Unix time, nanoseconds).
    pub time_unix_ns: u64,
    /// The drop reason (`podnetctl counters` spells them the same).
    pub reason: String,
    /// The program that dropped it (`from_pod`, `from_overlay`, ...).
    pub program: String,
    /// The device it arrived on.
    pub ifindex: u32,
    pub cpu: u32,
    /// Packet length in bytes.
    pub len: u32,
    /// `tcp`, `udp`, `icmp`, `sctp`, the number, or `0` when the frame was
    /// not IPv4 (then addresses and ports are 0 too).
    pub proto: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// 0 unless TCP, UDP or SCTP (and the first fragment).
    pub src_port: u16,
    pub dst_port: u16,
    /// The local pod: the one whose veth it arrived on, else the one whose
    /// address is its source, else its destination; `None`: no local pod.
    pub pod: Option<PodRef>,
    /// For a NetworkPolicy drop: the identities of the source and the
    /// destination (in that order), as the policy in force names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityRef>,
    /// For a `service_no_backend` drop: the Service whose frontend the
    /// packet went to (`namespace/name`), as the agent's plan in force
    /// names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// A NetworkPolicy identity, as drop events name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRef {
    pub id: u32,
    /// `x: pod=a,app=web` for a pod identity; `host`, `world`,
    /// `remote-node` for the reserved ones.
    pub name: String,
}

/// A local endpoint, as drop events name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    /// How the event was matched to it: `veth`, `source` or `destination`.
    pub matched: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response<T> {
    Ok(T),
    Error(String),
}

/// IPAM state for `podnetctl ipam`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamStatus {
    pub pod_cidr: ipnet::Ipv4Net,
    pub capacity: usize,
    /// The directory of the node store the reservations are read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    /// The node's reservations by network (one address space: the lists
    /// never share an address, except for what stores of an older podnet
    /// handed out twice).
    pub networks: std::collections::BTreeMap<String, Vec<Reservation>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the podnet agent at {socket}")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the podnet agent at {socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the podnet agent sent an answer that is not valid JSON")]
    Decode(#[source] serde_json::Error),
    #[error("the podnet agent refused: {0}")]
    Refused(String),
}

/// Blocking client (the CNI plugin and podnetctl are short-lived).
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    #[must_use]
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            timeout: Duration::from_secs(30),
        }
    }

    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn io_err(&self) -> impl Fn(std::io::Error) -> ClientError + '_ {
        |source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Connects, sends `request` and reads the first answer line as `T`.
    fn open<T: DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<(T, BufReader<UnixStream>), ClientError> {
        let io_err = self.io_err();
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(&io_err)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(&io_err)?;
        let mut line = serde_json::to_vec(request).map_err(ClientError::Decode)?;
        line.push(b'\n');
        stream.write_all(&line).map_err(&io_err)?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).map_err(&io_err)?;
        match serde_json::from_str::<Response<T>>(&answer).map_err(ClientError::Decode)? {
            Response::Ok(value) => Ok((value, reader)),
            Response::Error(msg) => Err(ClientError::Refused(msg)),
        }
    }

    /// Sends `request` and decodes the answer as `T`.
    pub fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ClientError> {
        self.open(request).map(|(value, _)| value)
    }

    /// Sends a streaming `request` ([`Request::Monitor`]): its first answer
    /// as `H`, then the messages as they come (no read timeout: a stream
    /// may be quiet for long).
    pub fn stream<H: DeserializeOwned, M: DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<(H, MessageStream<M>), ClientError> {
        let (hello, reader) = self.open(request)?;
        reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(self.io_err())?;
        Ok((
            hello,
            MessageStream {
                reader,
                socket: self.socket.clone(),
                _message: std::marker::PhantomData,
            },
        ))
    }
}

/// The messages of a streaming request, one JSON line each; ends when the
/// agent closes the connection.
pub struct MessageStream<M> {
    reader: BufReader<UnixStream>,
    socket: PathBuf,
    _message: std::marker::PhantomData<M>,
}

impl<M: DeserializeOwned> Iterator for MessageStream<M> {
    type Item = Result<M, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).map_err(ClientError::Decode)),
            Err(source) => Some(Err(ClientError::Io {
                socket: self.socket.clone(),
                source,
            })),
        }
    }
}

#[cfg(test)]
mod cluster_objects_tests {
    use super::*;

    #[test]
    fn the_status_line_names_every_kind_in_order() {
        let status = ClusterObjectsStatus {
            backend: "etcd".into(),
            connected: true,
            revision: 123,
            counts: [
                ("endpointslices", 1),
                ("namespaces", 3),
                ("networkpolicies", 2),
                ("pods", 9),
                ("services", 1),
            ]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect(),
            pod_records: 9,
            resyncs: 1,
            ..ClusterObjectsStatus::default()
        };
        assert_eq!(
            status.summary(),
            "revision 123, namespaces 3, pods 9, networkpolicies 2, services 1, \
             endpointslices 1, pod records 9 (1 resync)"
        );
        let lost = ClusterObjectsStatus {
            connected: false,
            last_error: Some("etcd down".into()),
            unreadable: 2,
            ..status
        };
        assert!(
            lost.summary()
                .ends_with("(1 resync); NOT WATCHING: etcd down; 2 unreadable, left out"),
            "{}",
            lost.summary()
        );
        // An older agent's answer has no cluster objects.
        let old: AgentStatus = serde_json::from_value(serde_json::json!({
            "node": {"node_name": "n", "pod_cidr": "10.244.0.0/24",
                     "cluster_cidr": "10.244.0.0/16", "gateway": "10.244.0.1",
                     "mtu": 1450, "ipam_dir": "/x"},
            "endpoints": 0, "attach_mode": "tcx", "bpffs_dir": "/b", "programs": []
        }))
        .expect("an older agent's status");
        assert_eq!(old.cluster_objects, None);
        assert_eq!(old.services, None);
    }
}
