//! The verbs over fake plumbing and a fake agent: what the built-in
//! IPAM does for two networks on one node, without root.

use std::{cell::RefCell, collections::BTreeMap, rc::Rc};

use super::*;
use crate::ipam::{Allocator, FileStore, PodRange};

#[derive(Default)]
struct Fakes {
    /// host ifname -> ifindex
    host: BTreeMap<String, u32>,
    /// (netns, ifname) -> pod interface
    pods: BTreeMap<(PathBuf, String), PodIfState>,
    /// owner -> endpoint
    endpoints: BTreeMap<Owner, Endpoint>,
    next_index: u32,
    /// The networks the agent was asked to GC.
    gc_calls: Vec<String>,
    /// Failures to inject.
    fail: Failures,
}

/// What the fakes are told to fail, to test what ADD and DEL undo.
#[derive(Default, Clone, Copy)]
struct Failures {
    /// The agent refuses every endpoint (a validation error, say).
    agent_refuses: bool,
    /// The agent is not running.
    agent_down: bool,
    /// Bringing the pod's link up fails (after the agent has the endpoint).
    activate: bool,
}

fn unreachable() -> ClientError {
    ClientError::Unreachable {
        socket: "/run/podnet/test.sock".into(),
        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    }
}

#[derive(Clone, Default)]
struct Node(Rc<RefCell<Fakes>>, PathBuf);

impl PodPlumbing for Node {
    fn create(&self, spec: &PodIfSpec) -> Result<PodIfCreated, CniError> {
        let mut f = self.0.borrow_mut();
        f.next_index += 1;
        let index = f.next_index;
        let mac = [2, 0, 0, 0, 0, u8::try_from(index).expect("few")];
        f.host.insert(spec.host_ifname.clone(), index);
        f.pods.insert(
            (spec.netns.clone(), spec.ifname.clone()),
            PodIfState {
                mac,
                mtu: spec.mtu,
                addresses: vec![(spec.ip, 32)],
                routes: vec![Route {
                    dst: Ipv4Addr::UNSPECIFIED,
                    prefix: 0,
                    gateway: Some(spec.gateway),
                    oif: 2,
                }],
            },
        );
        Ok(PodIfCreated {
            host_ifindex: index,
            host_mac: [2, 0, 0, 0, 1, mac[5]],
            pod_mac: mac,
        })
    }
    fn activate(&self, _: &PodIfSpec, _: &PodIfCreated) -> Result<(), CniError> {
        if self.0.borrow().fail.activate {
            return Err(CniError::new(code::IO_FAILURE, "set link up: injected"));
        }
        Ok(())
    }
    fn delete_host(&self, host_ifname: &str) -> Result<bool, CniError> {
        Ok(self.0.borrow_mut().host.remove(host_ifname).is_some())
    }
    fn host_ifindex(&self, host_ifname: &str) -> Result<Option<u32>, CniError> {
        Ok(self.0.borrow().host.get(host_ifname).copied())
    }
    fn root_tbf(&self, _: &str) -> Result<Option<crate::shaping::Tbf>, CniError> {
        Ok(None)
    }
    fn pod_interface(&self, netns: &Path, ifname: &str) -> Result<Option<PodIfState>, CniError> {
        Ok(self
            .0
            .borrow()
            .pods
            .get(&(netns.to_owned(), ifname.to_owned()))
            .cloned())
    }
}

impl AgentApi for Node {
    fn node(&self) -> Result<NodeInfo, ClientError> {
        if self.0.borrow().fail.agent_down {
            return Err(unreachable());
        }
        Ok(NodeInfo {
            node_name: "n1".into(),
            pod_cidr: "10.244.20.0/24".parse().expect("cidr"),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            gateway: Ipv4Addr::new(10, 244, 20, 1),
            mtu: 1450,
            ipam_dir: self.1.join("agent-ipam"),
        })
    }
    fn add_endpoint(&self, endpoint: &Endpoint) -> Result<(), ClientError> {
        let mut f = self.0.borrow_mut();
        if f.fail.agent_refuses {
            return Err(ClientError::Refused("invalid endpoint: injected".into()));
        }
        f.endpoints.insert(endpoint.owner.clone(), endpoint.clone());
        Ok(())
    }
    fn remove_endpoint(&self, owner: &Owner) -> Result<(), ClientError> {
        if self.0.borrow().fail.agent_down {
            return Err(unreachable());
        }
        self.0.borrow_mut().endpoints.remove(owner);
        Ok(())
    }
    fn get_endpoint(&self, owner: &Owner) -> Result<Option<Endpoint>, ClientError> {
        Ok(self.0.borrow().endpoints.get(owner).cloned())
    }
    fn gc(&self, network: &str, valid: &[Owner]) -> Result<Vec<Owner>, ClientError> {
        let mut f = self.0.borrow_mut();
        f.gc_calls.push(network.to_owned());
        let stale: Vec<Owner> = f
            .endpoints
            .values()
            .filter(|e| e.network == network && !valid.contains(&e.owner))
            .map(|e| e.owner.clone())
            .collect();
        for o in &stale {
            f.endpoints.remove(o);
        }
        Ok(stale)
    }
}

struct Harness {
    node: Node,
    dir: PathBuf,
    /// The pod `CNI_ARGS` names for the next ADDs.
    pod: RefCell<Option<crate::endpoint::PodRef>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("podnet-plugin-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("netns")).expect("temp dir");
        Self {
            node: Node(Rc::default(), dir.clone()),
            dir,
            pod: RefCell::default(),
        }
    }

    fn conf(network: &str, extra: &Value) -> Value {
        let mut conf = json!({"cniVersion": "1.1.0", "name": network, "type": "podnet"});
        if let (Some(obj), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
        }
        conf
    }

    fn run(
        &self,
        command: Command,
        container: &str,
        ifname: &str,
        conf: &Value,
    ) -> Result<Option<String>, CniError> {
        let env = CniEnv {
            command,
            container_id: container.into(),
            // The fakes never enter it; ADD only checks it exists.
            netns: Some(self.dir.join("netns")),
            ifname: ifname.into(),
            cni_path: String::new(),
            pod: self.pod.borrow().clone(),
        };
        let plumbing = self.node.clone();
        let agent_node = self.node.clone();
        let agent = move |_: &Path| -> Box<dyn AgentApi> { Box::new(agent_node.clone()) };
        let deps = Deps {
            plumbing: &plumbing,
            agent: &agent,
        };
        run(&env, conf.to_string().as_bytes(), &deps)
    }

    /// ADD; the result and the address.
    fn add(&self, network: &str, container: &str, ifname: &str) -> (Value, Ipv4Addr) {
        let out = self
            .run(
                Command::Add,
                container,
                ifname,
                &Harness::conf(network, &Value::Null),
            )
            .unwrap_or_else(|e| panic!("ADD {container} in {network}: {e}"))
            .expect("a result");
        let result: Value = serde_json::from_str(&out).expect("JSON");
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("an address");
        (result, ip)
    }

    fn check(
        &self,
        network: &str,
        container: &str,
        ifname: &str,
        prev: &Value,
    ) -> Result<(), CniError> {
        let mut conf = Harness::conf(network, &Value::Null);
        conf["prevResult"] = prev.clone();
        self.run(Command::Check, container, ifname, &conf)
            .map(|_| ())
    }

    /// The node store's reservations of `network`.
    fn held(&self, network: &str) -> Vec<Ipv4Addr> {
        let store = FileStore::open(&self.dir.join("agent-ipam")).expect("store");
        let alloc = Allocator::new(
            PodRange::new("10.244.20.0/24".parse().expect("cidr")).expect("range"),
            store,
        );
        alloc
            .reservations()
            .expect("reservations")
            .into_iter()
            .filter(|r| r.holder.network == network)
            .map(|r| r.ip)
            .collect()
    }
}

#[test]
fn the_pod_named_in_cni_args_goes_to_the_agent() {
    let h = Harness::new("pod-ref");
    h.add("podnet", "plain", "eth0");
    let pod = crate::endpoint::PodRef {
        namespace: "x".into(),
        name: "a".into(),
    };
    *h.pod.borrow_mut() = Some(pod.clone());
    h.add("podnet", "named", "eth0");
    let f = h.node.0.borrow();
    let pod_of = |id: &str| {
        f.endpoints
            .values()
            .find(|e| e.owner.container_id == id)
            .expect("endpoint")
            .pod
            .clone()
    };
    assert_eq!(pod_of("plain"), None);
    assert_eq!(pod_of("named"), Some(pod));
}

#[test]
fn two_networks_on_one_node_share_the_address_space() {
    let h = Harness::new("two-nets");
    let mut seen = std::collections::HashSet::new();
    for n in 0..20 {
        let network = if n % 2 == 0 { "net-a" } else { "net-b" };
        let (_, ip) = h.add(network, &format!("pod{n}"), "eth0");
        assert!(seen.insert(ip), "{ip} handed out twice");
    }
    // One container in both networks: two attachments, two addresses,
    // both endpoints stay with the agent.
    let (res_a, ip_a) = h.add("net-a", "multi", "eth0");
    let (res_b, ip_b) = h.add("net-b", "multi", "net1");
    assert_ne!(ip_a, ip_b);
    assert!(!seen.contains(&ip_a) && !seen.contains(&ip_b));
    assert_eq!(h.node.0.borrow().endpoints.len(), 22);

    // CHECK finds each network's own record.
    h.check("net-a", "multi", "eth0", &res_a)
        .expect("CHECK in net-a");
    h.check("net-b", "multi", "net1", &res_b)
        .expect("CHECK in net-b");
    // net-a holds nothing for multi/net1, whatever prevResult says.
    let err = h
        .check("net-a", "multi", "net1", &res_b)
        .expect_err("not net-a's attachment");
    assert_eq!(err.code, code::CHECK_FAILED);
    assert!(
        err.msg
            .contains("holds no address for multi/net1 in network net-a"),
        "{err}"
    );

    // DEL in net-a releases net-a's address only.
    let b_before = h.held("net-b");
    h.run(
        Command::Del,
        "multi",
        "eth0",
        &Harness::conf("net-a", &Value::Null),
    )
    .expect("DEL in net-a");
    assert!(!h.held("net-a").contains(&ip_a));
    assert_eq!(h.held("net-b"), b_before);
    // A DEL in net-b naming net-a's attachment (wrong conf) releases
    // nothing of net-b's.
    h.run(
        Command::Del,
        "multi",
        "eth0",
        &Harness::conf("net-b", &Value::Null),
    )
    .expect("DEL is idempotent");
    assert_eq!(h.held("net-b"), b_before);

    // GC of net-a: net-a's stale records go, net-b keeps all of its.
    let mut gc = Harness::conf("net-a", &Value::Null);
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "pod0", "ifname": "eth0"}]);
    h.run(Command::Gc, "", "", &gc).expect("GC");
    assert_eq!(h.held("net-a").len(), 1, "only pod0 kept in net-a");
    assert_eq!(h.held("net-b"), b_before, "GC of net-a keeps net-b");
    assert_eq!(h.node.0.borrow().gc_calls, vec!["net-a".to_owned()]);
    h.check("net-b", "multi", "net1", &res_b)
        .expect("net-b's attachment is intact");
}

#[test]
fn a_data_dir_beside_the_serving_store_is_refused_with_a_config_error() {
    let h = Harness::new("data-dir");
    h.add("net-a", "pod1", "eth0");
    let other = h.dir.join("other-ipam");
    let conf = Harness::conf(
        "net-c",
        &json!({"ipam": {"type": "podnet", "dataDir": other}}),
    );
    let err = h
        .run(Command::Add, "pod2", "eth0", &conf)
        .expect_err("a second store for the node's pod CIDR");
    assert_eq!(err.code, code::INVALID_CONFIG, "{err}");
    assert!(
        err.msg.contains("10.244.20.0/24") && err.msg.contains("ipam.dataDir"),
        "{err}"
    );
    assert_eq!(
        h.node.0.borrow().host.len(),
        1,
        "nothing was built for pod2"
    );
    // The same dataDir as the agent's root is the same store.
    let same = Harness::conf(
        "net-c",
        &json!({"ipam": {"type": "podnet", "dataDir": h.dir.join("agent-ipam")}}),
    );
    h.run(Command::Add, "pod2", "eth0", &same)
        .expect("same store");
    assert_eq!(h.held("net-c").len(), 1);
}

impl Harness {
    fn fail(&self, fail: Failures) {
        self.fakes().fail = fail;
    }

    fn fakes(&self) -> std::cell::RefMut<'_, Fakes> {
        self.node.0.borrow_mut()
    }

    fn add_err(&self, container: &str) -> CniError {
        self.run(
            Command::Add,
            container,
            "eth0",
            &Harness::conf("podnet", &Value::Null),
        )
        .expect_err("ADD fails")
    }

    /// Nothing of `container`'s attachment is left: no address, no host
    /// veth, no endpoint with the agent.
    fn assert_nothing_left(&self, container: &str) {
        assert!(self.held("podnet").is_empty(), "{:?}", self.held("podnet"));
        let owner = Owner {
            container_id: container.into(),
            ifname: "eth0".into(),
        };
        let f = self.fakes();
        assert!(!f.host.contains_key(&host_ifname(&owner)), "host veth left");
        assert!(!f.endpoints.contains_key(&owner), "endpoint left");
    }
}

#[test]
fn an_add_the_agent_refuses_leaves_no_address_and_no_veth() {
    let h = Harness::new("agent-refuses");
    h.fail(Failures {
        agent_refuses: true,
        ..Failures::default()
    });
    let err = h.add_err("pod1");
    assert!(err.to_string().contains("injected"), "{err}");
    h.assert_nothing_left("pod1");
    // The address comes back: the next ADD gets the first one.
    h.fail(Failures::default());
    let (_, ip) = h.add("podnet", "pod2", "eth0");
    assert_eq!(
        ip,
        Ipv4Addr::new(10, 244, 20, 3),
        "after the rolled-back .2"
    );
}

#[test]
fn an_add_that_fails_after_the_agent_has_the_endpoint_takes_it_back() {
    let h = Harness::new("activate-fails");
    h.fail(Failures {
        activate: true,
        ..Failures::default()
    });
    let err = h.add_err("pod1");
    assert_eq!(err.code, code::IO_FAILURE, "{err}");
    h.assert_nothing_left("pod1");
}

#[test]
fn add_without_the_agent_is_a_try_again_and_touches_nothing() {
    let h = Harness::new("agent-down-add");
    h.fail(Failures {
        agent_down: true,
        ..Failures::default()
    });
    let err = h.add_err("pod1");
    assert_eq!(err.code, code::TRY_AGAIN_LATER, "{err}");
    h.assert_nothing_left("pod1");
}

#[test]
fn del_without_the_agent_still_releases_the_address_and_the_veth() {
    let h = Harness::new("agent-down-del");
    let (_, ip) = h.add("podnet", "pod1", "eth0");
    assert_eq!(h.held("podnet"), [ip]);
    // What the agent leaves beside its socket for this case: where the
    // IPAM store is.
    let socket = h.dir.join("agent.sock");
    let node = h.node.node().expect("node info");
    std::fs::write(
        crate::api::node_info_path(&socket),
        serde_json::to_vec(&node).expect("json"),
    )
    .expect("cache node info");
    h.fail(Failures {
        agent_down: true,
        ..Failures::default()
    });
    h.run(
        Command::Del,
        "pod1",
        "eth0",
        &Harness::conf("podnet", &json!({"agentSocket": socket})),
    )
    .expect("DEL succeeds while the agent is down");
    assert!(h.held("podnet").is_empty());
    let owner = Owner {
        container_id: "pod1".into(),
        ifname: "eth0".into(),
    };
    assert!(!h.fakes().host.contains_key(&host_ifname(&owner)));
}
