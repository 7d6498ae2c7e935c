//! The selecting policies of this node's endpoints as the datapath's map
//! entries, and the datapath's lookups over them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    rc::Rc,
};

use ipnet::Ipv4Net;
use podnet_common::{
    endpoint::{ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS},
    policy::{
        IDENTITY_ANY, IDENTITY_ANY_POD, IDENTITY_FIRST_CIDR_SET, IDENTITY_FIRST_POD, IDENTITY_HOST,
        IDENTITY_UNKNOWN, IDENTITY_WORLD, POLICY_CIDR_PREFIX_BASE, POLICY_KEY_BITS,
        POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, PolicyCidrKey, PolicyKey, PolicyRule,
    },
};

use crate::model::cluster::{
    ClusterModel, selector_matches,
    types::{IntOrString, LabelSelector, NetworkPolicyPeer, NetworkPolicyPort},
};

use super::{
    Direction, IdentityAllocator, IdentityLabels, LocalEndpoint, PolicyInput, RuleRef,
    cidr::{self, key_address},
    ports::{mask_port, port_range_prefixes, protocol_number},
    spec::{self, PeerPod, Policy, Rule},
};

/// What the maps should hold for this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyPlan {
    /// Every pod IP whose Pod object is known to its identity; this node's
    /// addresses to `IDENTITY_HOST`.
    pub identities: BTreeMap<Ipv4Addr, u32>,
    /// Every local endpoint to its `ENDPOINT_F_POLICY_*` bits.
    pub endpoints: BTreeMap<Ipv4Addr, u32>,
    /// The rules trie: (prefix length, key) to the rule.
    pub rules: BTreeMap<(u32, PolicyKey), PolicyRule>,
    /// The CIDR-sets trie: (prefix length, key) to the CIDR set's identity
    /// (`IDENTITY_UNKNOWN`: the address is in no block, an `except` hole).
    pub cidrs: BTreeMap<(u32, PolicyCidrKey), u32>,
    /// The rules by number: `PolicyRule::rule` is the index + 1.
    pub rule_table: Vec<RuleRef>,
    /// The pod identities in use.
    pub identity_labels: BTreeMap<u32, IdentityLabels>,
}

impl PolicyPlan {
    /// The rule a number stands for.
    pub fn rule(&self, number: u32) -> Option<&RuleRef> {
        let index = usize::try_from(number.checked_sub(1)?).ok()?;
        self.rule_table.get(index)
    }

    /// The identity the datapath gives a peer address: its entry in the
    /// identities map, else `IDENTITY_REMOTE_NODE` for another node's
    /// address, else `IDENTITY_WORLD`.
    pub fn peer_identity(&self, peer: Ipv4Addr, is_remote_node: impl Fn(Ipv4Addr) -> bool) -> u32 {
        if let Some(identity) = self.identities.get(&peer) {
            *identity
        } else if is_remote_node(peer) {
            podnet_common::policy::IDENTITY_REMOTE_NODE
        } else {
            IDENTITY_WORLD
        }
    }

    /// The datapath's rule lookups for a connection of local `endpoint`
    /// (its steps 2 to 5: the peer's identity, any pod, any peer, the
    /// peer's CIDR set): the rule that allows it, or `None`. No rule holds
    /// another node's address, so it is looked up as the world. Whether
    /// the endpoint is isolated at all, and the node's own ingress, are
    /// [`PolicyPlan::allows`]'s.
    pub fn lookup(
        &self,
        endpoint: Ipv4Addr,
        direction: Direction,
        peer: Ipv4Addr,
        protocol: u8,
        port: u16,
    ) -> Option<&RuleRef> {
        let endpoint_key = key_address(endpoint);
        let direction = direction.as_u8();
        let identity = self.peer_identity(peer, |_| false);
        let lookup = |identity| self.rule_lookup(endpoint_key, identity, direction, protocol, port);
        let found = lookup(identity)
            .or_else(|| {
                (IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR_SET)
                    .contains(&identity)
                    .then(|| lookup(IDENTITY_ANY_POD))
                    .flatten()
            })
            .or_else(|| lookup(IDENTITY_ANY))
            .or_else(|| {
                let set = self.cidr_lookup(endpoint_key, direction, peer)?;
                (set != IDENTITY_UNKNOWN).then(|| lookup(set)).flatten()
            })?;
        self.rule(found.rule)
    }

    /// Whether the datapath lets a new connection through: an endpoint not
    /// isolated for the direction, ingress from this node, or a rule.
    pub fn allows(
        &self,
        endpoint: Ipv4Addr,
        direction: Direction,
        peer: Ipv4Addr,
        protocol: u8,
        port: u16,
    ) -> bool {
        let flag = match direction {
            Direction::Ingress => ENDPOINT_F_POLICY_INGRESS,
            Direction::Egress => ENDPOINT_F_POLICY_EGRESS,
        };
        let flags = self.endpoints.get(&endpoint).copied().unwrap_or_default();
        flags & flag == 0
            || (direction == Direction::Ingress
                && self.identities.get(&peer) == Some(&IDENTITY_HOST))
            || self
                .lookup(endpoint, direction, peer, protocol, port)
                .is_some()
    }

    /// An LPM lookup in the rules trie.
    fn rule_lookup(
        &self,
        endpoint: u32,
        identity: u32,
        direction: u8,
        protocol: u8,
        port: u16,
    ) -> Option<&PolicyRule> {
        (POLICY_PREFIX_ANY_PROTOCOL..=POLICY_KEY_BITS)
            .rev()
            .filter(|prefix| {
                *prefix == POLICY_PREFIX_ANY_PROTOCOL || *prefix >= POLICY_PREFIX_ANY_PORT
            })
            .find_map(|prefix| {
                let key = PolicyKey {
                    endpoint,
                    identity,
                    direction,
                    protocol: if prefix >= POLICY_PREFIX_ANY_PORT {
                        protocol
                    } else {
                        0
                    },
                    port: mask_port(port, prefix).to_be(),
                };
                self.rules.get(&(prefix, key))
            })
    }

    /// An LPM lookup in the CIDR-sets trie.
    fn cidr_lookup(&self, endpoint: u32, direction: u8, peer: Ipv4Addr) -> Option<u32> {
        (0..=32u8).rev().find_map(|bits| {
            let net = Ipv4Net::new(peer, bits).ok()?.trunc();
            let key = PolicyCidrKey {
                endpoint,
                direction: u32::from(direction),
                address: key_address(net.network()),
            };
            self.cidrs
                .get(&(POLICY_CIDR_PREFIX_BASE + u32::from(bits), key))
                .copied()
        })
    }
}

/// Ports of a rule, resolved to numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PortEntry {
    /// Every protocol and port.
    All,
    /// Every port of a protocol.
    Protocol(u8),
    /// A port range of a protocol.
    Range(u8, u16, u16),
}

impl PortEntry {
    /// The trie entries: (prefix length, protocol, port in host order).
    fn prefixes(self) -> Vec<(u32, u8, u16)> {
        match self {
            Self::All => vec![(POLICY_PREFIX_ANY_PROTOCOL, 0, 0)],
            Self::Protocol(protocol) => vec![(POLICY_PREFIX_ANY_PORT, protocol, 0)],
            Self::Range(protocol, first, last) => port_range_prefixes(first, last)
                .into_iter()
                .map(|(port, prefix)| (prefix, protocol, port))
                .collect(),
        }
    }
}

/// A named port of a rule.
#[derive(Debug, Clone, Copy)]
struct NamedPort<'a> {
    protocol: u8,
    protocol_name: &'a str,
    name: &'a str,
}

/// A rule's ports: numbers, and names still to resolve.
fn split_ports(ports: Option<&[NetworkPolicyPort]>) -> (Vec<PortEntry>, Vec<NamedPort<'_>>) {
    let Some(ports) = ports else {
        return (vec![PortEntry::All], Vec::new());
    };
    let mut numbers = Vec::new();
    let mut names = Vec::new();
    for port in ports {
        let Some(protocol) = protocol_number(port.protocol.as_deref()) else {
            continue;
        };
        match &port.port {
            None => numbers.push(PortEntry::Protocol(protocol)),
            Some(IntOrString::Int(first)) => {
                let last = port.end_port.unwrap_or(*first);
                if let (Ok(first), Ok(last)) = (u16::try_from(*first), u16::try_from(last)) {
                    numbers.push(PortEntry::Range(protocol, first, last));
                }
            }
            Some(IntOrString::String(name)) => names.push(NamedPort {
                protocol,
                protocol_name: port.protocol.as_deref().unwrap_or("TCP"),
                name,
            }),
        }
    }
    (numbers, names)
}

/// The numbers named ports have on some pods.
fn resolve_names(
    model: &ClusterModel,
    names: &[NamedPort],
    pods: &[(&str, &str)],
) -> Vec<PortEntry> {
    let mut numbers = BTreeSet::new();
    for named in names {
        for &(namespace, pod) in pods {
            if let Some(number) = model.named_port(namespace, pod, named.name, named.protocol_name)
            {
                numbers.insert(PortEntry::Range(named.protocol, number, number));
            }
        }
    }
    numbers.into_iter().collect()
}

/// Whom a rule's peer stands for in the tries.
#[derive(Debug, Clone)]
enum Target {
    /// Every peer.
    Any,
    /// Every pod.
    AnyPod,
    /// These pod identities.
    Identities(Vec<u32>),
    /// An `ipBlock`.
    Block(Ipv4Net, Vec<Ipv4Net>),
}

/// A block of an endpoint's CIDR sets.
#[derive(Debug, Clone)]
struct Block {
    net: Ipv4Net,
    except: Vec<Ipv4Net>,
    ports: Vec<PortEntry>,
    rule: u32,
}

/// The compile's state: what every endpoint shares.
struct Compiler<'a, 'i> {
    input: &'a PolicyInput<'i>,
    pods: BTreeMap<Ipv4Addr, PeerPod<'i>>,
    /// Pod identities and their pods.
    members: BTreeMap<u32, Vec<PeerPod<'i>>>,
    labels: BTreeMap<u32, &'a IdentityLabels>,
    /// Namespace labels, as namespace selectors see them.
    namespaces: BTreeMap<&'i str, std::borrow::Cow<'i, BTreeMap<String, String>>>,
    /// Each rule's targets, resolved once.
    targets: HashMap<u32, Rc<[Target]>>,
    /// The identities a pair of selectors selects, by the pair (and the
    /// policy's namespace when there is no namespace selector): policies
    /// often repeat selectors.
    selections: HashMap<String, Vec<u32>>,
    next_cidr_set: u32,
    plan: PolicyPlan,
}

/// The plan for this node's endpoints. New label sets get numbers from
/// `identities`; the numbers of label sets no pod has any more are freed.
pub fn compile(input: &PolicyInput, identities: &mut IdentityAllocator) -> PolicyPlan {
    let pods = spec::pods_by_ip(input);
    let pod_labels: BTreeMap<Ipv4Addr, IdentityLabels> = pods
        .iter()
        .map(|(ip, pod)| {
            (
                *ip,
                IdentityLabels {
                    namespace: pod.namespace.to_owned(),
                    labels: pod.labels.clone(),
                },
            )
        })
        .collect();
    let used: BTreeSet<&IdentityLabels> = pod_labels.values().collect();
    for labels in &used {
        identities.allocate(labels);
    }
    identities.retain(&used);

    let mut plan = PolicyPlan::default();
    let mut members: BTreeMap<u32, Vec<PeerPod>> = BTreeMap::new();
    let mut labels = BTreeMap::new();
    let mut namespaces = BTreeMap::new();
    for (ip, pod) in &pods {
        let Some(identity) = pod_labels.get(ip).and_then(|l| identities.identity_of(l)) else {
            continue;
        };
        plan.identities.insert(*ip, identity);
        members.entry(identity).or_default().push(*pod);
        if let Some(l) = pod_labels.get(ip) {
            labels.insert(identity, l);
        }
        namespaces
            .entry(pod.namespace)
            .or_insert_with(|| spec::namespace_labels(input.model, pod.namespace));
    }
    for address in input.host_addresses {
        plan.identities.insert(*address, IDENTITY_HOST);
    }
    plan.identity_labels = labels
        .iter()
        .map(|(identity, labels)| (*identity, (*labels).clone()))
        .collect();

    let policies: Vec<Policy> = spec::policies(input.model, None).collect();
    let numbers = number_rules(&policies, &mut plan.rule_table);

    let mut compiler = Compiler {
        input,
        pods,
        members,
        labels,
        namespaces,
        targets: HashMap::new(),
        selections: HashMap::new(),
        next_cidr_set: IDENTITY_FIRST_CIDR_SET,
        plan,
    };
    let mut endpoints: Vec<&LocalEndpoint> = input.local.iter().collect();
    endpoints.sort_by_key(|e| e.ip);
    let no_labels = BTreeMap::new();
    for endpoint in endpoints {
        if compiler.plan.endpoints.contains_key(&endpoint.ip) {
            continue;
        }
        let labels = input
            .model
            .pod_labels(&endpoint.namespace, &endpoint.name)
            .unwrap_or(&no_labels);
        let mut flags = 0;
        for direction in Direction::BOTH {
            let selecting: Vec<usize> = policies
                .iter()
                .enumerate()
                .filter(|(_, p)| p.applies(direction) && p.selects(&endpoint.namespace, labels))
                .map(|(i, _)| i)
                .collect();
            if selecting.is_empty() {
                continue;
            }
            flags |= match direction {
                Direction::Ingress => ENDPOINT_F_POLICY_INGRESS,
                Direction::Egress => ENDPOINT_F_POLICY_EGRESS,
            };
            let rules = numbered_rules(&policies, &selecting, &numbers, direction);
            compiler.endpoint_direction(endpoint, direction, &rules);
        }
        compiler.plan.endpoints.insert(endpoint.ip, flags);
    }
    compiler.plan
}

/// The rules of the `selecting` policies for `direction`, with their numbers.
fn numbered_rules<'p, 'a>(
    policies: &'p [Policy<'a>],
    selecting: &[usize],
    numbers: &HashMap<(usize, Direction, usize), u32>,
    direction: Direction,
) -> Vec<(u32, &'p Policy<'a>, Rule<'a>)> {
    let mut rules = Vec::new();
    for &p in selecting {
        let policy = &policies[p];
        for (i, rule) in policy.rules(direction).into_iter().enumerate() {
            if let Some(number) = numbers.get(&(p, direction, i)) {
                rules.push((*number, policy, rule));
            }
        }
    }
    rules
}

/// Rule numbers: every rule of every policy, in key order, ingress rules
/// before egress ones; by (policy, direction, rule index).
fn number_rules(
    policies: &[Policy],
    table: &mut Vec<RuleRef>,
) -> HashMap<(usize, Direction, usize), u32> {
    let mut numbers = HashMap::new();
    for (p, policy) in policies.iter().enumerate() {
        for direction in Direction::BOTH {
            for index in 0..policy.rules(direction).len() {
                table.push(RuleRef {
                    namespace: policy.namespace.to_owned(),
                    policy: policy.name.to_owned(),
                    direction,
                    index,
                });
                let number = u32::try_from(table.len()).unwrap_or(u32::MAX);
                numbers.insert((p, direction, index), number);
            }
        }
    }
    numbers
}

impl Compiler<'_, '_> {
    /// The entries of one endpoint's rules for one direction.
    fn endpoint_direction(
        &mut self,
        endpoint: &LocalEndpoint,
        direction: Direction,
        rules: &[(u32, &Policy, Rule)],
    ) {
        let model = self.input.model;
        let endpoint_key = key_address(endpoint.ip);
        let mut blocks: Vec<Block> = Vec::new();
        for &(number, policy, rule) in rules {
            let targets = self.targets(number, policy, rule);
            let (mut numbers, names) = split_ports(rule.ports);
            if direction == Direction::Ingress {
                numbers.extend(resolve_names(
                    model,
                    &names,
                    &[(endpoint.namespace.as_str(), endpoint.name.as_str())],
                ));
            }
            for target in targets.iter() {
                if !numbers.is_empty() {
                    self.emit(
                        endpoint_key,
                        direction,
                        target,
                        &numbers,
                        number,
                        &mut blocks,
                    );
                }
                if direction == Direction::Ingress || names.is_empty() {
                    continue;
                }
                // Egress to named ports: the numbers on the peers.
                match target {
                    Target::Any | Target::AnyPod => {
                        let identities: Vec<u32> = self.members.keys().copied().collect();
                        self.emit_named_per_identity(
                            endpoint_key,
                            direction,
                            &identities,
                            &names,
                            number,
                        );
                    }
                    Target::Identities(identities) => {
                        self.emit_named_per_identity(
                            endpoint_key,
                            direction,
                            identities,
                            &names,
                            number,
                        );
                    }
                    Target::Block(net, except) => {
                        for (ip, pod) in self.pods.range(net.network()..=net.broadcast()) {
                            if except.iter().any(|e| e.contains(ip)) {
                                continue;
                            }
                            let ports = resolve_names(model, &names, &[(pod.namespace, pod.name)]);
                            if !ports.is_empty() {
                                blocks.push(Block {
                                    net: Ipv4Net::from(*ip),
                                    except: Vec::new(),
                                    ports,
                                    rule: number,
                                });
                            }
                        }
                    }
                }
            }
        }
        self.cidr_sets(endpoint_key, direction, &blocks);
    }

    fn emit_named_per_identity(
        &mut self,
        endpoint: u32,
        direction: Direction,
        identities: &[u32],
        names: &[NamedPort],
        rule: u32,
    ) {
        for identity in identities {
            let Some(pods) = self.members.get(identity) else {
                continue;
            };
            let ports = resolve_names(
                self.input.model,
                names,
                &pods
                    .iter()
                    .map(|p| (p.namespace, p.name))
                    .collect::<Vec<_>>(),
            );
            for port in ports {
                self.insert_rule(endpoint, *identity, direction, port, rule);
            }
        }
    }

    fn emit(
        &mut self,
        endpoint: u32,
        direction: Direction,
        target: &Target,
        ports: &[PortEntry],
        rule: u32,
        blocks: &mut Vec<Block>,
    ) {
        let identities: &[u32] = match target {
            Target::Any => &[IDENTITY_ANY],
            Target::AnyPod => &[IDENTITY_ANY_POD],
            Target::Identities(identities) => identities,
            Target::Block(net, except) => {
                blocks.push(Block {
                    net: *net,
                    except: except.clone(),
                    ports: ports.to_vec(),
                    rule,
                });
                return;
            }
        };
        for identity in identities {
            for port in ports {
                self.insert_rule(endpoint, *identity, direction, *port, rule);
            }
        }
    }

    fn insert_rule(
        &mut self,
        endpoint: u32,
        identity: u32,
        direction: Direction,
        port: PortEntry,
        rule: u32,
    ) {
        for (prefix, protocol, port) in port.prefixes() {
            let key = PolicyKey {
                endpoint,
                identity,
                direction: direction.as_u8(),
                protocol,
                port: port.to_be(),
            };
            self.plan
                .rules
                .entry((prefix, key))
                .and_modify(|r| r.rule = r.rule.min(rule))
                .or_insert(PolicyRule { rule, reserved: 0 });
        }
    }

    /// A rule's peers as targets (computed once per rule).
    fn targets(&mut self, number: u32, policy: &Policy, rule: Rule) -> Rc<[Target]> {
        if let Some(targets) = self.targets.get(&number) {
            return Rc::clone(targets);
        }
        let targets: Rc<[Target]> = match rule.peers {
            None => Rc::new([Target::Any]),
            Some(peers) => peers
                .iter()
                .filter_map(|peer| self.target(policy, peer))
                .collect(),
        };
        self.targets.insert(number, Rc::clone(&targets));
        targets
    }

    fn target(&mut self, policy: &Policy, peer: &NetworkPolicyPeer) -> Option<Target> {
        if let Some(block) = &peer.ip_block {
            let net = cidr::parse(&block.cidr)?;
            let except = block
                .except
                .iter()
                .flatten()
                .filter_map(|e| cidr::parse(e))
                .collect();
            return Some(Target::Block(net, except));
        }
        let is_empty = |s: &LabelSelector| {
            s.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
                && s.match_expressions.as_ref().is_none_or(Vec::is_empty)
        };
        match (&peer.pod_selector, &peer.namespace_selector) {
            (None, None) => None,
            (pods, Some(namespaces))
                if is_empty(namespaces) && pods.as_ref().is_none_or(is_empty) =>
            {
                Some(Target::AnyPod)
            }
            (pods, namespaces) => {
                let key = format!(
                    "{pods:?}|{namespaces:?}|{}",
                    if namespaces.is_none() {
                        policy.namespace
                    } else {
                        ""
                    }
                );
                if let Some(identities) = self.selections.get(&key) {
                    return Some(Target::Identities(identities.clone()));
                }
                let identities: Vec<u32> = self
                    .labels
                    .iter()
                    .filter(|(_, labels)| {
                        let namespace = match namespaces {
                            None => labels.namespace == policy.namespace,
                            Some(selector) => self
                                .namespaces
                                .get(labels.namespace.as_str())
                                .is_some_and(|l| selector_matches(selector, l)),
                        };
                        namespace
                            && pods
                                .as_ref()
                                .is_none_or(|s| selector_matches(s, &labels.labels))
                    })
                    .map(|(identity, _)| *identity)
                    .collect();
                self.selections.insert(key, identities.clone());
                Some(Target::Identities(identities))
            }
        }
    }

    /// The CIDR-sets trie entries of one endpoint's blocks for one
    /// direction, and the rule entries of each set.
    fn cidr_sets(&mut self, endpoint: u32, direction: Direction, blocks: &[Block]) {
        let points: BTreeSet<Ipv4Net> = blocks
            .iter()
            .flat_map(|b| std::iter::once(b.net).chain(b.except.iter().copied()))
            .collect();
        // The blocks by network: a point's blocks are among its supernets'.
        let mut by_net: BTreeMap<Ipv4Net, Vec<usize>> = BTreeMap::new();
        for (i, block) in blocks.iter().enumerate() {
            by_net.entry(block.net).or_default().push(i);
        }
        let mut sets: BTreeMap<Vec<usize>, u32> = BTreeMap::new();
        for point in points {
            let mut set: Vec<usize> = (0..=point.prefix_len())
                .filter_map(|bits| Ipv4Net::new(point.network(), bits).ok())
                .filter_map(|net| by_net.get(&net.trunc()))
                .flatten()
                .copied()
                .filter(|&b| !blocks[b].except.iter().any(|e| e.contains(&point)))
                .collect();
            set.sort_unstable();
            let identity = if set.is_empty() {
                IDENTITY_UNKNOWN
            } else if let Some(identity) = sets.get(&set) {
                *identity
            } else {
                let identity = self.next_cidr_set;
                self.next_cidr_set = self.next_cidr_set.saturating_add(1);
                for &b in &set {
                    for port in &blocks[b].ports {
                        self.insert_rule(endpoint, identity, direction, *port, blocks[b].rule);
                    }
                }
                sets.insert(set, identity);
                identity
            };
            let key = PolicyCidrKey {
                endpoint,
                direction: u32::from(direction.as_u8()),
                address: key_address(point.network()),
            };
            self.plan.cidrs.insert(
                (POLICY_CIDR_PREFIX_BASE + u32::from(point.prefix_len()), key),
                identity,
            );
        }
    }
}
